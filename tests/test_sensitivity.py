"""Partial-graph evaluation equals full runs; sensitivity scores and their allocation."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxprune
from models.resnet_cifar import CIFAR_MEAN, CIFAR_STD
from onnxprune import api
from onnxprune.analysis.graph import analyse_graph
from onnxprune.analysis.layers import Layer, find_layers
from onnxprune.errors import InputError
from onnxprune.planning import allocation
from onnxprune.runtime.partial import Part, PartialEvaluator


def _cifar(path, start, n):
    d = np.load(path)
    x = d["x"][start:start + n].astype(np.float32) / 255
    return (x - np.array(CIFAR_MEAN, np.float32)[:, None, None]) / np.array(CIFAR_STD, np.float32)[:, None, None]


@pytest.mark.parametrize("name,inject", [("resnet56", "inputs"), ("resnet56", "initializers"),
                                         ("transformer-pre", "inputs"), ("transformer-pre", "initializers")])
def test_partial_evaluation_equals_full_model(export, cifar_lossless, digits_npz, name, inject):
    """Oracle: replacing one layer's weight in the suffix session (fed as an input, or injected as an
    initializer when the session is made) gives the same outputs as a full run of the model with that weight
    replaced (ONNX Runtime both ways)."""
    path = export(name)
    model = ir.load(path)
    info = analyse_graph(model)
    layers = find_layers(info)
    chosen = layers[:: max(1, len(layers) // 6)]
    pe = PartialEvaluator(model, info, [Part(layer.name, [layer.name], [layer.weight]) for layer in chosen],
                          inject=inject)
    if name == "resnet56":
        x = _cifar(cifar_lossless, 0, 32)
    else:
        x = np.load(digits_npz)["x"][:32].astype(np.float32) / 255
    acts = pe.run_prefix({"input": x})
    proto = onnx.load(str(path))
    full_ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(acts[pe.output_names[0]], full_ref, atol=1e-5)
    rng = np.random.default_rng(0)
    for layer in chosen:
        init = next(t for t in proto.graph.initializer if t.name == layer.weight)
        w = rng.standard_normal(tuple(init.dims)).astype(np.float32) * 0.1
        partial = pe.run_part(layer.name, acts, {layer.weight: w})[0]
        p2 = onnx.ModelProto()
        p2.CopyFrom(proto)
        next(t for t in p2.graph.initializer if t.name == layer.weight).CopyFrom(
            onnx.numpy_helper.from_array(w, layer.weight))
        full = ort.InferenceSession(p2.SerializeToString()).run(None, {"input": x})[0]
        np.testing.assert_allclose(partial, full, atol=1e-4, rtol=1e-4)
        assert not np.allclose(full, full_ref, atol=1e-3)  # the replacement really changed the output


def test_sensitivity_scores_on_resnet56(export, cifar_jpeg):
    r56 = export("resnet56")
    sc = api.score(r56, "sensitivity", data=cifar_jpeg, offset=1017, limit=128, batch_size=128,
                   grid=(0.5, 0.9))
    assert sc.options["samples"] == 128 and sc.metric == "kl"
    assert len(sc.units) == 56
    for u in sc.units:
        kls = [p["kl"] for p in u["curve"]]
        assert kls[0] == 0.0 and kls[2] >= 0.0
    # pruning 90 % of the stem conv hurts more than 90 % of a late 3x3 conv of stage 3
    by = sc.by_name()
    stem = by[sc.units[0]["name"]]["curve"][2]["kl"]
    late = by[sc.units[-3]["name"]]["curve"][2]["kl"]
    assert stem > late
    plan = api.allocate(r56, target_sparsity=0.7, method="sensitivity", scores=sc)
    assert abs(plan.totals["params_sparsity"] - 0.7) <= 0.001
    with pytest.raises(InputError, match="needs scores from onnxprune score --method sensitivity"):
        api.allocate(r56, target_sparsity=0.7, method="sensitivity", scores=api.score(r56))


def test_hull_allocation_prefers_cheap_layers():
    """Two layers of equal size: the one whose drop rises late takes the sparsity first."""
    def unit(name, curve):
        return allocation.Allocatable(name=name, n=100, flops=100, layer=Layer(name, "MatMul", "w", (10, 10), 100, 1),
                               importance=1.0, curve=curve)

    cheap = unit("cheap", [(0.0, 0.0), (0.5, 0.0), (0.9, 0.1)])
    costly = unit("costly", [(0.0, 0.0), (0.5, 1.0), (0.9, 5.0)])
    s = allocation.allocate_sparsities([cheap, costly], "sensitivity", 0.5)
    assert s[0] == pytest.approx(0.9) and s[1] == pytest.approx(0.1)
    assert np.dot([100, 100], s) / 200 == pytest.approx(0.5)
    with pytest.raises(InputError, match="cannot be met"):
        allocation.allocate_sparsities([cheap, costly], "sensitivity", 0.95)


def test_score_cli_sensitivity_without_labels_needs_no_top1(export, digits_npz, tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=np.load(digits_npz)["x"][:64])
    with pytest.raises(InputError, match="needs labels"):
        api.score(export("cnn"), "sensitivity", data=path, metric="top1")
    sc = api.score(export("cnn"), "sensitivity", data=path, metric="agreement", grid=(0.5,))
    assert all("top1" not in p for u in sc.units for p in u["curve"])
    assert onnxprune.inspect(export("cnn")).fingerprint == sc.fingerprint


def test_search_allocation_improves_on_its_seeds(export, digits_npz):
    """search meets the total exactly, never ends worse than its best seed on the calibration objective, and
    is reproducible for a seed."""
    cnn = export("cnn")
    plans = [api.allocate(cnn, target_sparsity=0.8, method="search", data=digits_npz, iterations=25, seed=3)
             for _ in range(2)]
    log = plans[0].options["search"]
    assert abs(plans[0].totals["params_sparsity"] - 0.8) <= 0.001
    assert log["final_loss"] <= min(log["seeds"].values())
    assert log["evaluations"] == 25 + len(log["seeds"])
    assert plans[0].sparsities() == plans[1].sparsities()
    with pytest.raises(InputError, match="exactly one of --data"):
        api.allocate(cnn, target_sparsity=0.8, method="search")


def test_compactness_matches_its_definition(export, digits_npz, tmp_path):
    """At the reported compactness a layer's top-1 drop is within the tolerance; a step further it is not
    (checked by independent full-model evaluations of the pruned layer)."""
    cnn = export("cnn")
    sc = api.score(cnn, "compactness", data=digits_npz, tolerance=2.0)
    base = sc.options["reference"]["top1"]
    d = np.load(digits_npz)
    x, y = d["x"].astype(np.float32) / 255, d["y"]
    proto = onnx.load(str(cnn))
    layer = sc.units[1]

    def top1_at(sparsity):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        init = next(t for t in p.graph.initializer if t.name == layer["weight"])
        w = onnx.numpy_helper.to_array(init).copy()
        flat = w.reshape(-1)
        flat[np.argsort(np.abs(flat), kind="stable")[: int(round(sparsity * flat.size))]] = 0
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        logits = ort.InferenceSession(p.SerializeToString()).run(None, {"input": x})[0]
        return 100 * np.mean(logits.argmax(1) == y)

    c = layer["metrics"]["compactness"]
    assert 0 < c < 0.99
    assert base - top1_at(c) <= 2.0
    assert base - top1_at(min(c + 0.99 / 2**8 * 2, 0.99)) > 2.0 or c + 0.01 >= 0.99
    assert layer["importance"] == pytest.approx(max(1 - c, 0.01))
    plan = api.allocate(cnn, target_sparsity=0.7, method="capacity", scores=sc)
    assert abs(plan.totals["params_sparsity"] - 0.7) <= 0.001


def test_skip_conv_after_branch_loads_and_matches_full_runs(tmp_path):
    """ONNX Runtime 1.31 fuses a Conv into the Add after it even when the Conv's output is a graph output, and
    then cannot load the model (seen with 10 channels: not a multiple of its 8-channel blocks): a projection
    shortcut whose skip Conv comes after the branch in node order (found by tests/test_fuzz.py). The prefix
    taps cut values through Identities."""
    import onnx
    from onnx import helper

    from tests.graphs import make_model, tensor, weights

    c = 10
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, name="c2"),  # branch
        helper.make_node("Conv", ["r1", "w3"], ["c3"], name="c3"),  # 1x1 skip, after the branch
        helper.make_node("Add", ["c3", "c2"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="r2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc"),
    ]
    inits = [weights("w1", c, 3, 3, 3, seed=1, scale=0.3), weights("w2", c, c, 3, 3, seed=2, scale=0.15),
             weights("b2", c, seed=3, scale=0.1), weights("w3", c, c, 1, 1, seed=4, scale=0.4),
             weights("fc", c * 8 * 8, 5, seed=5, scale=0.05)]
    path = tmp_path / "skip_after.onnx"
    onnx.save(make_model(nodes, [tensor("input", "N", 3, 8, 8)], [tensor("logits", "N", 5)], inits), str(path))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 32))
    sc = api.score(path, "sensitivity", data=data, grid=(0.5,), metric="agreement")
    assert len(sc.units) == 4 and all(np.isfinite(u["mean_drop"]) for u in sc.units)
    sr = api.score(path, "srinit", data=data, units="layers", metric="agreement")
    assert len(sr.units) == 4
