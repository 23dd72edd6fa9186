"""Same model, data, options and seed give byte-identical scores.json, plan.json and output model; every
artefact records the tool version, its options and its seed."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxprune._version import __version__
from tests.runner import cli


def twice(tmp_path: Path, name: str, *args) -> tuple[bytes, Path]:
    """Run a command writing ``-o <tmp>/<run>/<name>`` in two folders; both files' bytes must be equal."""
    outs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir(exist_ok=True)
        cli(*[a.format(run=folder) if isinstance(a, str) else a for a in args], "-o", folder / name)
        outs.append(folder / name)
    first, second = (p.read_bytes() for p in outs)
    assert first == second, f"{name} differs between two identical runs"
    return first, outs[0]


@pytest.fixture(scope="module")
def proj(export):
    return export("resnet-proj")


SCORE_RUNS = {
    "capacity": ("--method", "capacity", "--metric", "effective_rank"),
    "sensitivity": ("--method", "sensitivity", "--grid", "0.3,0.6", "--limit", "128"),
    "compactness": ("--method", "compactness", "--limit", "128"),
    "srinit": ("--method", "srinit", "--seed", "3", "--seeds", "2", "--limit", "128"),
}


@pytest.mark.parametrize("method", list(SCORE_RUNS))
def test_scores_are_byte_identical(proj, digits_npz, tmp_path, method):
    data = () if method == "capacity" else ("--data", digits_npz)
    raw, _ = twice(tmp_path, "scores.json", "score", proj, *SCORE_RUNS[method], *data)
    scores = json.loads(raw)
    assert scores["onnxprune_version"] == __version__ and scores["method"] == method
    assert scores["seed"] == (3 if method == "srinit" else None)
    assert "seconds" not in json.dumps(scores)  # wall times go to the terminal and --json, not the artefact
    if data:
        record = scores["options"]["data"]
        assert record["data"] == Path(digits_npz).name and len(record["sha256"]) == 32 and record["limit"] == 128


def test_srinit_seed_changes_the_scores(proj, digits_npz, tmp_path):
    """The seed is really used: another seed re-initialises differently (a test that can fail)."""
    drops = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}.json"
        cli("score", proj, "--method", "srinit", "--seed", seed, "--limit", "128", "--data", digits_npz, "-o", out)
        drops.append([u["drop"] for u in json.loads(out.read_text())["units"]])
    assert drops[0] != drops[1]


@pytest.mark.parametrize("method, extra", [
    ("lamp", ()),
    ("capacity", ("--scores", "{scores}")),
    ("search", ("--data", "{digits}", "--limit", "128", "--iterations", "30", "--seed", "7")),
    ("channel", ("--granularity", "channel", "--budget", "flops", "--round-to", "2")),
])
def test_plans_are_byte_identical(proj, digits_npz, tmp_path, method, extra):
    scores = tmp_path / "scores.json"
    cli("score", proj, "-o", scores)
    extra = [a.format(scores=scores, digits=digits_npz) for a in extra]
    alloc = "uniform" if method == "channel" else method
    raw, _ = twice(tmp_path, "plan.json", "allocate", proj, "--method", alloc, "--target-sparsity", "0.5", *extra)
    plan = json.loads(raw)
    assert plan["onnxprune_version"] == __version__ and plan["seed"] == (7 if method == "search" else None)
    assert plan["options"]["min_sparsity"] is not None
    if method == "search":
        assert plan["options"]["search"]["seed"] == 7 and plan["options"]["search"]["data"]["limit"] == 128


@pytest.mark.parametrize("kind", ["unstructured", "n:m", "channel", "channel-refit", "blocks"])
def test_pruned_models_are_byte_identical(proj, digits_npz, tmp_path, kind):
    plan = tmp_path / "plan.json"
    if kind == "blocks":
        scores = tmp_path / "sr.json"
        cli("score", proj, "--method", "srinit", "--data", digits_npz, "--limit", "128", "-o", scores)
        cli("allocate", proj, "--method", "srinit", "--scores", scores, "--remove", "1", "-o", plan)
    elif kind.startswith("channel"):
        cli("allocate", proj, "--method", "lamp", "--granularity", "channel", "--target-sparsity", "0.3", "-o", plan)
    else:
        cli("allocate", proj, "--method", "lamp", "--target-sparsity", "0.5", "-o", plan)
    extra = {"unstructured": (), "n:m": ("--granularity", "n:m"), "channel": (),
             "channel-refit": ("--data", digits_npz, "--limit", "128"), "blocks": ()}[kind]
    _, path = twice(tmp_path, "pruned.onnx", "apply", proj, plan, *extra)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    record = json.loads(meta["onnxprune.apply"])
    assert record["onnxprune_version"] == __version__ and len(record["input_fingerprint"]) == 32
    assert record["plan"]["method"] == ("srinit" if kind == "blocks" else "lamp")
    assert record["options"]["granularity"] == ("unstructured" if kind == "blocks" else kind.split("-")[0])
    if kind == "channel-refit":
        assert record["options"]["refit_data"]["limit"] == 128
    # the source model's own metadata survives
    assert meta.get("onnxprune.source") == {p.key: p.value for p in onnx.load(str(proj)).metadata_props}.get(
        "onnxprune.source")


def test_pruning_twice_keeps_the_history(proj, tmp_path):
    plan = tmp_path / "plan.json"
    cli("allocate", proj, "--method", "uniform", "--target-sparsity", "0.3", "-o", plan)
    cli("apply", proj, plan, "-o", tmp_path / "once.onnx")
    plan2 = tmp_path / "plan2.json"
    cli("allocate", tmp_path / "once.onnx", "--method", "uniform", "--target-sparsity", "0.6", "-o", plan2)
    cli("apply", tmp_path / "once.onnx", plan2, "-o", tmp_path / "twice.onnx")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "twice.onnx")).metadata_props}
    record = json.loads(meta["onnxprune.apply"])
    assert record["previous"]["plan"]["method"] == "uniform" and record["previous"]["input_fingerprint"] != \
        record["input_fingerprint"]
