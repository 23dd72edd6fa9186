"""prune (one command), sweep and report; every --json output and artefact against its JSON Schema."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import schemas
from onnxprune.cli import main
from tests.runner import cli as run


def cli(*args, schema: str | None = None) -> dict | str:
    """Run a command; with ``schema``, add --json and validate stdout against that schema."""
    stdout = run(*args, *(["--json"] if schema else []))
    if schema is None:
        return stdout
    data = json.loads(stdout)
    jsonschema.validate(data, schemas.load(schema))
    return data


def artefact(path: Path, schema: str) -> dict:
    data = json.loads(path.read_text())
    jsonschema.validate(data, schemas.load(schema))
    return data


def test_prune_unstructured_writes_three_files_and_measures(export, digits_npz, tmp_path):
    model = export("cnn")
    res = cli("prune", model, "--target-sparsity", "0.6", "--data", digits_npz, "-o", tmp_path / "p.onnx",
              schema="prune")
    scores = artefact(tmp_path / "p.scores.json", "scores")
    plan = artefact(tmp_path / "p.plan.json", "plan")
    assert res["mode"] == "unstructured" and res["method"] == "lamp" and plan["method"] == "lamp"
    assert scores["method"] == "capacity" and abs(plan["totals"]["params_sparsity"] - 0.6) <= 0.001
    assert res["before"]["params"] == res["after"]["params"]  # zeros, not removals
    assert res["before"]["top1"] > 95 and res["after"]["top1"] is not None
    assert res["before"]["latency_ms"] > 0 and res["after"]["latency_ms"] > 0
    # the same as the three verbs by hand
    by_hand = onnxprune.apply(model, onnxprune.Plan.from_dict(plan), tmp_path / "hand.onnx")
    x = np.load(digits_npz)["x"][:16].astype(np.float32) / 255
    a, b = (ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (tmp_path / "p.onnx", by_hand.path))
    np.testing.assert_array_equal(a, b)


def test_prune_flops_refits_with_data(export, digits_npz, tmp_path):
    res = cli("prune", export("cnn"), "--target-flops", "0.5", "--data", digits_npz, "-o", tmp_path / "c.onnx",
              "--no-latency", schema="prune")
    assert res["mode"] == "channel" and res["after"]["flops"] <= 0.5 * res["before"]["flops"] + 1
    assert res["after"]["params"] < res["before"]["params"] and res["totals"]["refit"]["layers"] > 0
    assert res["after"]["top1"] > 90  # refit keeps the small CNN accurate without training
    assert res["before"]["latency_ms"] is None


def test_prune_remove_blocks(export, digits_npz, tmp_path):
    model = export("resnet-proj")
    res = cli("prune", model, "--remove-blocks", "1", "--data", digits_npz, "--limit", "200", "-o",
              tmp_path / "b.onnx", "--no-latency", schema="prune")
    assert res["mode"] == "blocks" and res["totals"]["blocks_removed"] == 1
    assert artefact(tmp_path / "b.scores.json", "scores")["method"] == "srinit"
    assert len(onnxprune.inspect(tmp_path / "b.onnx").blocks) == len(onnxprune.inspect(model).blocks) - 1


@pytest.mark.parametrize("args, fragment", [
    (["--target-sparsity", "0.5", "--target-flops", "0.5"], "exactly one goal"),
    (["--remove-blocks", "1"], "needs --data"),
    (["--target-sparsity", "0.5", "--method", "search"], "give --data"),
    (["--target-sparsity", "0.5", "--method", "nope"], "unknown --method"),
])
def test_prune_bad_usage(export, tmp_path, args, fragment):
    result = CliRunner().invoke(main, ["prune", str(export("cnn")), *args, "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and fragment in result.stderr and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def sweep_json(export, digits_npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    res = cli("sweep", export("cnn"), "--data", digits_npz, "--sparsities", "0.5,0.8", "--methods",
              "uniform,lamp,capacity", "-o", out, schema="sweep")
    assert res == artefact(out, "sweep")
    return out


def test_sweep_rows_are_the_measured_accuracies(export, digits_npz, sweep_json, tmp_path):
    sw = json.loads(sweep_json.read_text())
    assert len(sw["rows"]) == 6 and sw["dense"]["top1"] > 95
    row = next(r for r in sw["rows"] if r["method"] == "lamp" and r["sparsity"] == 0.8)
    # recompute one cell by hand through the verbs
    plan = onnxprune.allocate(export("cnn"), method="lamp", target_sparsity=0.8)
    onnxprune.apply(export("cnn"), plan, tmp_path / "l.onnx")
    assert onnxprune.eval(tmp_path / "l.onnx", digits_npz).top1 == pytest.approx(row["top1"])
    assert all(abs(r["params_removed"] - r["sparsity"]) <= 0.001 for r in sw["rows"])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.ids: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("#"):
                self.external.append(a[key])


@pytest.fixture(scope="module")
def report_html(export, digits_npz, sweep_json, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    model = export("resnet-proj")
    cli("score", model, "--method", "srinit", "--data", digits_npz, "--limit", "200", "-o", d / "sr.json",
        schema="score")
    cli("allocate", model, "--method", "srinit", "--scores", d / "sr.json", "--threshold", "1000", "-o",
        d / "blocks.json", schema="allocate")
    out = d / "report.html"
    res = cli("report", "--scores", d / "sr.json", "--plan", d / "blocks.json", "-o", out, schema="report")
    assert res["bytes"] == out.stat().st_size
    return out


def test_report_is_self_contained_with_plots(report_html, export, sweep_json, tmp_path):
    page = _Collect()
    page.feed(report_html.read_text())
    assert "srinit" in page.ids and page.tags.count("svg") == 1 and page.tags.count("table") >= 2
    assert page.external == []  # nothing to fetch: opens offline
    # layer scores + plan + sweep: two more plots (layers, sweep)
    model = export("cnn")
    cli("score", model, "-o", tmp_path / "s.json")
    cli("allocate", model, "--scores", tmp_path / "s.json", "--target-sparsity", "0.6", "-o", tmp_path / "p.json")
    cli("report", "--scores", tmp_path / "s.json", "--plan", tmp_path / "p.json", "--sweep", sweep_json,
        "-o", tmp_path / "r.html")
    page = _Collect()
    page.feed((tmp_path / "r.html").read_text())
    assert {"layers", "sweep"} <= set(page.ids) and page.tags.count("svg") == 2


def test_report_refuses_mixed_models(export, sweep_json, report_html, tmp_path):
    sr = report_html.parent / "sr.json"  # resnet-proj; the sweep is of the cnn
    result = CliRunner().invoke(main, ["report", "--scores", str(sr), "--sweep", str(sweep_json), "-o",
                                       str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "different models" in result.stderr and not (tmp_path / "x.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (CI installs Debian's chromium for this test)")
def test_report_renders_in_headless_chromium(report_html, tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,900", report_html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a real picture, not a blank page
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          report_html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and dom.stdout.count("<svg") == 1 and "SR-init" in dom.stdout


@pytest.mark.parametrize("command, args", [
    ("inspect", ["{cnn}"]),
    ("eval", ["{cnn}", "--data", "{digits}", "--limit", "64"]),
    ("score", ["{cnn}", "-o", "{tmp}/s.json"]),
    ("allocate", ["{cnn}", "--method", "uniform", "--target-sparsity", "0.5", "-o", "{tmp}/p.json"]),
])
def test_json_outputs_follow_their_schemas(export, digits_npz, tmp_path, command, args):
    cli(command, *[a.format(cnn=export("cnn"), digits=digits_npz, tmp=tmp_path) for a in args], schema=command)


def test_apply_and_finetune_json_follow_their_schemas(export, digits_npz, tmp_path):
    model = export("cnn")
    cli("allocate", model, "--method", "uniform", "--target-sparsity", "0.5", "-o", tmp_path / "p.json")
    artefact(tmp_path / "p.json", "plan")
    cli("apply", model, tmp_path / "p.json", "-o", tmp_path / "a.onnx", schema="apply")
    cli("finetune", tmp_path / "a.onnx", "--data", digits_npz, "--epochs", "1", "--teacher", model,
        "-o", tmp_path / "t.onnx", schema="finetune")
    onnx.checker.check_model(str(tmp_path / "t.onnx"), full_check=True)


def test_schemas_reject_what_they_should():
    """The schemas are not vacuous: a plan with a sparsity of 1 or without a fingerprint fails."""
    good = {"schema": "onnxprune.plan/1", "onnxprune_version": "0", "method": "lamp", "seed": None,
            "budget": "params", "granularity": "unstructured", "model_fingerprint": "0" * 32, "options": {},
            "totals": {}, "layers": [{"name": "a", "sparsity": 0.5}], "blocks": []}
    jsonschema.validate(good, schemas.load("plan"))
    for bad in ({**good, "layers": [{"name": "a", "sparsity": 1.0}]}, {k: v for k, v in good.items()
                                                                        if k != "model_fingerprint"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schemas.load("plan"))


def test_prune_with_bad_eval_data_writes_nothing(export, digits_npz, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 1, 4, 8), np.uint8), y=np.zeros(4, np.int64))
    result = CliRunner().invoke(main, ["prune", str(export("cnn")), "--target-sparsity", "0.5", "--eval-data",
                                       str(bad), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 2 and "does not match model input" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]
