"""Scorers (capacity, sensitivity, compactness, SR-init) on hand-built models, against full-model oracles."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from onnxprune import api
from onnxprune.errors import InputError
from onnxprune.runtime.data import DataSpec
from onnxprune.scoring import capacity
from onnxprune.scoring.common import ScoreRequest
from onnxprune.scoring.registry import SCORERS
from onnxprune.tensors.weights import as_matrix, get_weight
from tests.graphs import make_model, tensor
from tests.unit.nets import (
    analysed,
    conv_chain,
    initializer,
    mlp,
    relu,
    residual,
    run,
    stable_mask,
    with_weights,
    write_npz,
)


def test_scorers_in_order():
    assert list(SCORERS) == ["capacity", "sensitivity", "compactness", "srinit", "influence"]
    assert [name for name, s in SCORERS.items() if not s.needs_data] == ["capacity"]
    assert api.SCORE_METHODS == tuple(SCORERS)


@pytest.mark.parametrize("method,options,match", [
    ("capacity", {"metric": "kl"}, "capacity metric"),
    ("sensitivity", {"metric": "mean_abs"}, "sensitivity metric"),
    ("sensitivity", {"grid": (0.5, 1.0)}, "grid"),
    ("sensitivity", {"grid": (-0.1,)}, "grid"),
    ("compactness", {"tolerance": 0.0}, "tolerance"),
    ("compactness", {"tolerance": -1.0}, "tolerance"),
    ("srinit", {"metric": "l2"}, "SR-init metric"),
    ("srinit", {"units": "heads"}, "units"),
    ("srinit", {"seeds": 0}, "seeds"),
    ("srinit", {"max_memory": 0}, "max-memory"),
])
def test_check_refuses_bad_options(method, options, match):
    SCORERS[method].check(ScoreRequest())  # the defaults are fine
    with pytest.raises(InputError, match=match):
        SCORERS[method].check(ScoreRequest(**options))


# ---------------------------------------------------------------- capacity

def capacity_oracle(m: np.ndarray) -> dict[str, float]:
    sigma = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum()
    return {"mean_abs": float(np.abs(m).mean()), "l2": float(np.sqrt((m.astype(np.float64) ** 2).mean())),
            "stable_rank": float((sigma ** 2).sum() / sigma[0] ** 2 / min(m.shape)),
            "effective_rank": float(np.exp(-(p * np.log(p)).sum()) / min(m.shape))}


@pytest.mark.parametrize("metric", list(capacity.METRICS))
def test_capacity_is_the_metric_over_the_largest(metric):
    am = analysed(conv_chain())
    scores = api.score(am, "capacity", metric=metric)
    assert scores.method == "capacity" and scores.metric == metric and scores.fingerprint == am.fingerprint
    want = {lay.name: capacity_oracle(as_matrix(lay, np.asarray(get_weight(lay))))[metric] for lay in am.layers}
    got = scores.by_name()
    assert list(got) == ["c1", "c2", "fc"]
    for lay in am.layers:
        u = got[lay.name]
        assert u["metrics"][metric] == pytest.approx(want[lay.name], rel=1e-5)
        assert u["importance"] == pytest.approx(want[lay.name] / max(want.values()), rel=1e-5)
        assert u["params"] == int(np.prod(lay.weight_shape)) and u["flops"] == am.weight_flops(lay) > 0
        assert u["weight_shape"] == list(lay.weight_shape)
    assert max(u["importance"] for u in scores.units) == 1.0


def test_capacity_refuses_a_model_without_layers():
    am = analysed(make_model([relu("x", "y")], [tensor("x", "N", 4)], [tensor("y", "N", 4)]))
    with pytest.raises(InputError, match="no prunable layers"):
        api.score(am, "capacity")


# ---------------------------------------------------------------- sensitivity and compactness

def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def drops(proto, x, y, pruned) -> dict[str, float]:
    """Oracle: kl, agreement and top1 of the whole model with the weights ``pruned`` against the model."""
    ref, out = log_softmax(run(proto, {"x": x})[0]), log_softmax(run(with_weights(proto, pruned), {"x": x})[0])
    return {"kl": float((np.exp(ref) * (ref - out)).sum(1).mean()),
            "agreement": 100.0 * float((ref.argmax(1) == out.argmax(1)).mean()),
            "top1": None if y is None else 100.0 * float((out.argmax(1) == y).mean())}


def magnitude_pruned(proto, weight: str, sparsity: float) -> dict[str, np.ndarray]:
    w = initializer(proto, weight)
    return {weight: w * stable_mask(w, round(sparsity * w.size))}


@pytest.fixture(scope="module")
def mlp_data(tmp_path_factory):
    proto = mlp((12, 16, 10, 5), (1.0, 0.6, 0.8))
    path = write_npz(tmp_path_factory.mktemp("data") / "d.npz", 40, 12, seed=5)
    return proto, path, np.load(path)["x"], np.load(path)["y"]


def test_sensitivity_curves_are_the_drops_of_the_pruned_model(mlp_data):
    proto, path, x, y = mlp_data
    am = analysed(proto)
    grid = (0.3, 0.6, 0.9)
    scores = api.score(am, "sensitivity", data=DataSpec(data=path, batch_size=16, provider="cpu"), grid=grid)
    assert scores.fingerprint == am.fingerprint and scores.options["samples"] == 40
    rising = 0
    for lay in am.layers:
        u = scores.by_name()[lay.name]
        curve = u["curve"]
        assert [p["sparsity"] for p in curve] == [0.0, *grid]
        assert curve[0]["kl"] == 0.0 and curve[0]["agreement"] == 100.0
        for p in curve[1:]:
            want = drops(proto, x, y, magnitude_pruned(proto, lay.weight, p["sparsity"]))
            assert p["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
            assert p["agreement"] == pytest.approx(want["agreement"]) and p["top1"] == pytest.approx(want["top1"])
        kls = [p["kl"] for p in curve]
        rising += all(a <= b for a, b in itertools.pairwise(kls))
        assert u["mean_drop"] == pytest.approx(np.mean(kls[1:]))
    assert rising >= 1
    top = max(u["mean_drop"] for u in scores.units)
    assert [u["importance"] for u in scores.units] == pytest.approx([u["mean_drop"] / top for u in scores.units])
    assert max(u["importance"] for u in scores.units) == 1.0


@pytest.mark.parametrize("labelled,tolerance", [(False, 5.0), (True, 3.0)])
def test_compactness_is_the_highest_sparsity_within_the_tolerance(mlp_data, tmp_path, labelled, tolerance):
    proto, _, _, _ = mlp_data
    path = write_npz(tmp_path / "d.npz", 40, 12, seed=5, labelled=False)
    x = np.load(path)["x"]
    y = run(proto, {"x": x})[0].argmax(1) if labelled else None  # labels the model gets right
    if labelled:
        np.savez(path, x=x, y=y)
    am = analysed(proto)
    scores = api.score(am, "compactness", data=DataSpec(data=path, provider="cpu"), tolerance=tolerance)
    criterion = "top1" if labelled else "agreement"
    base = drops(proto, x, y, {})[criterion]

    def drop(weight: str, sparsity: float) -> float:
        return base - drops(proto, x, y, magnitude_pruned(proto, weight, sparsity))[criterion]

    inside = 0
    for lay in am.layers:
        u = scores.by_name()[lay.name]
        c = u["metrics"]["compactness"]
        assert u["criterion"] == criterion and u["importance"] == max(1 - c, 0.01)
        assert drop(lay.weight, c) <= tolerance
        if c < 0.99:  # the bisection's last step (0.99 / 2^8) past it is over the tolerance
            inside += 1
            assert drop(lay.weight, c + 0.99 / 256) > tolerance
    assert inside >= 1


# ---------------------------------------------------------------- SR-init

def fresh_weights(am, blocks, seed: int) -> dict[str, np.ndarray]:
    """Oracle: SR-init's fresh model, Kaiming-normal conv weights (fan_in, ReLU gain) drawn by one generator
    over the blocks' layers in order."""
    rng = np.random.default_rng(seed)
    layers = {lay.name: lay for lay in am.layers}
    out = {}
    for block in blocks:
        for name in block.layers:
            shape = layers[name].weight_shape
            out[layers[name].weight] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    return out


@pytest.mark.parametrize("metric", ["kl", "agreement"])
def test_srinit_drop_is_the_reinitialised_model(tmp_path, metric):
    proto = residual(2)
    am = analysed(proto)
    path = write_npz(tmp_path / "d.npz", 24, 4, 6, 6, seed=2)
    x, y = np.load(path)["x"], np.load(path)["y"]
    scores = api.score(am, "srinit", data=DataSpec(data=path, batch_size=10, provider="cpu"), metric=metric,
                       seed=7)
    assert scores.unit_kind == "blocks" and scores.fingerprint == am.fingerprint
    assert [u["name"] for u in scores.units] == [b.name for b in am.blocks] == ["add0", "add1"]
    fresh = fresh_weights(am, am.blocks, 7)
    for block, u in zip(am.blocks, scores.units, strict=True):
        assert u["kind"] == "block" and u["layers"] == block.layers and u["params"] == block.params
        want = drops(proto, x, y, {w: fresh[w] for w in (f"wa{block.name[-1]}", f"wb{block.name[-1]}")})
        expect = want["kl"] if metric == "kl" else 100.0 - want["agreement"]
        assert u["drop"] == pytest.approx(expect, rel=1e-4, abs=1e-6)
        assert u["drop_se"] >= 0
    top = max(abs(u["drop"]) for u in scores.units)
    assert [u["importance"] for u in scores.units] == pytest.approx([u["drop"] / top for u in scores.units])
    assert max(abs(u["importance"]) for u in scores.units) == 1.0


@pytest.mark.parametrize("method,metric,labelled,match", [
    ("srinit", "kl", True, "no residual blocks"),
    ("srinit", "top1", False, "needs labels"),
    ("sensitivity", "top1", False, "needs labels"),
])
def test_data_scorers_refuse(mlp_data, tmp_path, method, metric, labelled, match):
    proto, path, x, _ = mlp_data
    if not labelled:
        np.savez(path := tmp_path / "x.npz", x=x)
    with pytest.raises(InputError, match=match):
        api.score(analysed(proto), method, metric=metric, data=DataSpec(data=path, provider="cpu"))


def test_block_influence_sees_a_block_that_changes_nothing(tmp_path):
    """Block influence (ShortGPT): 1 - cosine between a block's input and output. A block whose last conv is
    scaled down to almost nothing barely changes its input: lowest influence, the one a plan removes first."""
    from tests.unit.nets import save

    proto = residual(blocks=3)
    wb1 = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "wb1"))
    path = save(with_weights(proto, {"wb1": wb1 * 1e-4}), tmp_path / "res.onnx")
    data = write_npz(tmp_path / "d.npz", 16, 4, 6, 6)
    scores = api.score(path, "influence", data=data)
    drops = {u["name"]: u["drop"] for u in scores.units}
    assert set(drops) == {"add0", "add1", "add2"} and drops["add1"] < 1e-6 < min(drops["add0"], drops["add2"])
    plan = api.allocate(path, method="srinit", scores=scores, remove=1)
    assert [b["name"] for b in plan.blocks] == ["add1"]
    with pytest.raises(InputError, match="residual blocks"):
        api.score(path, "influence", data=data, units="layers")
