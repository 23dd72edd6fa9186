"""Models with external data through every command (the CI-sized version of tools/bench_bigmodel.py): outputs
stay external and valid, match the oracles, and pruning never holds a second copy of the weights."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import api
from tests.runner import cli
from tools.bench_bigmodel import generate


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """16 layers of 1024 x 1024 float32 (64 MiB), MatMul and Gemm(transB) alternating, external data."""
    return generate(tmp_path_factory.mktemp("ext") / "ext.onnx", layers=16, side=1024)


def external_files(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_every_command_on_an_external_data_model(big, tmp_path):
    info = json.loads(cli("inspect", big, "--json"))
    assert info["totals"]["layers"] == 16 and info["totals"]["params"] == 16 * 1024 * 1024 + 8 * 1024
    cli("score", big, "--metric", "l2", "-o", tmp_path / "scores.json")
    cli("allocate", big, "--scores", tmp_path / "scores.json", "--method", "capacity", "--target-sparsity", "0.7",
        "-o", tmp_path / "plan.json")
    cli("apply", big, tmp_path / "plan.json", "-o", tmp_path / "sparse.onnx")
    assert external_files(tmp_path / "sparse.onnx") == {"sparse.onnx.data"}  # external in, external out
    assert (tmp_path / "sparse.onnx.data").stat().st_size >= 16 * 1024 * 1024 * 4

    # oracle: every weight is the original times the magnitude mask of its planned count
    plan = json.loads((tmp_path / "plan.json").read_text())
    before = {t.name: t for t in onnx.load(str(big)).graph.initializer}
    after = {t.name: t for t in onnx.load(str(tmp_path / "sparse.onnx")).graph.initializer}
    for layer in plan["layers"]:
        w = onnx.numpy_helper.to_array(before[layer["weight"]])
        mask = np.ones(w.size, bool)
        mask[np.argsort(np.abs(w).reshape(-1), kind="stable")[:layer["zeros"]]] = False
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(after[layer["weight"]]), w * mask.reshape(w.shape))

    cli("allocate", big, "--method", "uniform", "--granularity", "channel", "--budget", "flops",
        "--target-sparsity", "0.5", "--round-to", "8", "-o", tmp_path / "channels.json")
    out = json.loads(cli("apply", big, tmp_path / "channels.json", "-o", tmp_path / "ch.onnx", "--json"))
    assert 0.5 <= out["totals"]["flops_fraction_removed"] < 0.6
    assert external_files(tmp_path / "ch.onnx") == {"ch.onnx.data"}
    onnx.checker.check_model(str(tmp_path / "ch.onnx"), full_check=True)
    x = np.random.default_rng(0).standard_normal((4, 1024)).astype(np.float32)
    assert run(tmp_path / "ch.onnx", x).shape == (4, 1024)
    # the old weights are gone from the output: it holds about the kept fraction of the parameters
    assert (tmp_path / "ch.onnx.data").stat().st_size < 0.6 * (big.parent / "ext.onnx.data").stat().st_size


def test_inline_output_from_external_input(big, tmp_path):
    """external_data=False writes every byte into the .onnx (no reference to the input's data file)."""
    plan = api.allocate(big, method="uniform", target_sparsity=0.3)
    res = api.apply(big, plan, tmp_path / "inline.onnx", external_data=False)
    assert external_files(res.path) == set() and not (tmp_path / "inline.onnx.data").exists()
    x = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    ref = api.apply(big, plan, tmp_path / "ext.onnx")
    np.testing.assert_array_equal(run(res.path, x), run(ref.path, x))


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_pruning_holds_no_second_copy(big, tmp_path, granularity):
    """Python-side allocations (numpy included) while apply prunes a memory-mapped 64 MiB model stay far
    below the model's size: pruned weights are computed while they are written, one layer at a time."""
    plan = api.allocate(big, method="uniform", target_sparsity=0.5, granularity=granularity)
    tracemalloc.start()
    try:
        api.apply(big, plan, tmp_path / f"{granularity}.onnx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (big.parent / "ext.onnx.data").stat().st_size
    assert peak < 0.5 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB model"


def test_measured_scores_read_external_weights_in_place(big, tmp_path):
    """SR-init and sensitivity score an external-data model exactly as its inline copy, and no partial-graph
    slice holds the weights (they reach ONNX Runtime over the memory map: a 7B model never meets protobuf's
    2 GB limit, which failed SR-init with an internal error)."""
    from onnxprune.analysis.model import AnalysedModel
    from onnxprune.io import load_model
    from onnxprune.runtime.partial import Part, PartialEvaluator

    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(big)), str(inline))
    x = np.random.default_rng(1).standard_normal((24, 1024)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    plan = api.allocate(big, method="uniform", target_sparsity=0.5)  # sensitivity around a plan: a reference session
    for options in (dict(method="srinit", units="layers", seeds=2), dict(method="sensitivity", grid=(0.5, 0.9)),
                    dict(method="sensitivity", grid=(0.9,), at=plan)):
        on_disk, in_memory = (api.score(p, data=str(tmp_path / "x.npz"), batch_size=8, **options)
                              for p in (big, inline))
        numbers = [json.dumps(s.units) for s in (on_disk, in_memory)]
        assert numbers[0] == numbers[1]  # as text: no labels, so top1 is NaN in both

    am = AnalysedModel(load_model(big), None)
    evaluator = PartialEvaluator(am.model, am.info, [Part("first", [am.layers[0].name], [am.layers[0].weight])],
                                 inject="initializers")
    suffix = evaluator.suffixes["first"]
    assert len(suffix.model) < 100_000 and len(suffix.stored) == 16 + 8 - 1  # weights and biases but its own
    assert evaluator.weight_bytes("first") >= 16 * 1024 * 1024 * 4
    np.testing.assert_array_equal(evaluator.run_prefix({"input": x[:8]})["output"], run(big, x[:8]))


def test_refit_and_search_read_external_weights_in_place(big, tmp_path):
    """The channel refit and the search's objective keep an external-data model's weights in their files
    (model_session), and give what they give on its inline copy."""
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(big)), str(inline))
    x = np.random.default_rng(3).standard_normal((32, 1024)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    data = str(tmp_path / "x.npz")
    plans = [api.allocate(p, method="search", target_sparsity=0.6, data=data, seed=0, iterations=6)
             for p in (big, inline)]
    assert plans[0].sparsities() == plans[1].sparsities()
    channel_plan = api.allocate(big, method="uniform", granularity="channel", budget="flops", target_sparsity=0.4)
    for p in (big, inline):
        api.apply(p, channel_plan, tmp_path / f"refit_{p.stem}.onnx", data=data)
    outs = [run(tmp_path / f"refit_{p.stem}.onnx", x[:4]) for p in (big, inline)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - run(big, x[:4])).max() > 0  # it did prune
