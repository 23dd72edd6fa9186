"""score -> allocate -> apply: exact totals, bounds, monotonicity, independent mask oracles, N:M pattern,
zero-plan identity, refusals, and the pipeline on the real ResNet-56."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import onnxprune
from models.resnet_cifar import CIFAR_MEAN, CIFAR_STD
from onnxprune import api
from onnxprune.artefacts import load_plan, write_json
from onnxprune.errors import InputError
from onnxprune.io import load_model
from onnxprune.planning import allocation
from tests.graphs import initializers_to_constants

CLI = [sys.executable, "-m", "onnxprune.cli"]


@pytest.fixture(scope="module")
def r56(export):
    return export("resnet56")


@pytest.fixture(scope="module")
def r56_weights(r56):
    """Layer name -> weight array, read independently with onnx."""
    proto = onnx.load(str(r56))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    info = onnxprune.inspect(r56)
    return {layer.name: inits[layer.weight] for layer in info.layers}


@pytest.fixture(scope="module")
def capacity_scores(r56):
    return api.score(r56, metric="l2")


def run_cli(*args, rc=0):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == rc, proc.stderr
    return proc


# --- allocation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["capacity", "uniform", "global", "lamp", "erk"])  # measured ones: test_sensitivity
@pytest.mark.parametrize("budget", ["params", "flops"])
def test_totals_exact_and_bounds(r56, capacity_scores, method, budget):
    for target in (0.5, 0.8):
        plan = api.allocate(r56, target_sparsity=target, method=method, scores=capacity_scores, budget=budget,
                            min_sparsity=0.1, max_sparsity=0.95)
        key = "params_sparsity" if budget == "params" else "flops_sparsity"
        assert abs(plan.totals[key] - target) <= 0.001
        # the claimed totals are what the per-layer counts add up to
        zeros = sum(e["zeros"] for e in plan.layers)
        assert zeros == plan.totals["zeros"]
        assert plan.totals["params_sparsity"] == pytest.approx(zeros / sum(e["params"] for e in plan.layers))
        for e in plan.layers:
            assert 0.1 - 1e-3 <= e["sparsity"] <= 0.95 + 1e-3
            assert e["zeros"] == round(e["sparsity"] * e["params"])


def test_capacity_is_monotone_in_importance(r56, capacity_scores):
    plan = api.allocate(r56, target_sparsity=0.7, method="capacity", scores=capacity_scores)
    pairs = sorted((e["importance"], e["sparsity"]) for e in plan.layers)
    for (i1, s1), (i2, s2) in zip(pairs, pairs[1:]):
        assert i2 >= i1 and s2 <= s1 + 1e-3  # rounding to whole weights only


def test_uniform_and_keep_dense(r56):
    first = onnxprune.inspect(r56).layers[0].name
    plan = api.allocate(r56, target_sparsity=0.6, method="uniform", keep_dense=[first])
    sp = plan.sparsities()
    assert sp[first] == 0.0
    others = [s for name, s in sp.items() if name != first]
    assert max(others) - min(others) < 0.01
    assert abs(plan.totals["params_sparsity"] - 0.6) <= 0.001


def test_global_is_one_magnitude_threshold(r56, r56_weights):
    """One threshold across layers; layers it would wipe out entirely are held at --max-sparsity (0.99)."""
    plan = api.allocate(r56, target_sparsity=0.7, method="global")
    pruned_max, kept_min, clipped = 0.0, np.inf, 0
    for e in plan.layers:
        a = np.sort(np.abs(r56_weights[e["name"]]).reshape(-1))
        if e["zeros"]:
            pruned_max = max(pruned_max, a[e["zeros"] - 1])
        if e["sparsity"] >= 0.99 - 1e-3:
            clipped += 1
        elif e["zeros"] < a.size:
            kept_min = min(kept_min, a[e["zeros"]])
    assert pruned_max <= kept_min
    assert clipped > 0  # folded BN scales: the global threshold empties whole layers (DESIGN.md pitfall)


def test_lamp_matches_independent_computation(r56, r56_weights):
    plan = api.allocate(r56, target_sparsity=0.7, method="lamp")
    names, scores = [], []
    for e in plan.layers:
        w2 = np.sort(r56_weights[e["name"]].astype(np.float64).reshape(-1) ** 2)
        denom = np.array([w2[i:].sum() for i in range(0, w2.size)]) if w2.size < 2000 else np.cumsum(w2[::-1])[::-1]
        scores.append(w2 / denom)
        names.append(e["name"])
    allv = np.concatenate(scores)
    owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)])
    k = plan.totals["zeros"]
    smallest = owner[np.argsort(allv, kind="stable")[:k]]
    expected = np.bincount(smallest, minlength=len(names))
    assert {n: int(c) for n, c in zip(names, expected)} == {e["name"]: e["zeros"] for e in plan.layers}


def test_erk_density_proportional_to_score(r56):
    plan = api.allocate(r56, target_sparsity=0.8, method="erk")
    info = {layer.name: layer for layer in onnxprune.inspect(r56).layers}
    ratios = []
    for e in plan.layers:
        shape = info[e["name"]].weight_shape
        if 0 < e["sparsity"] < 0.99:  # not clipped
            ratios.append((1 - e["sparsity"]) / (sum(shape) / np.prod(shape)))
    assert max(ratios) / min(ratios) < 1.02


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5000), st.floats(0.01, 1.0)), min_size=1, max_size=12),
    st.floats(0.0, 0.95),
    st.floats(0.0, 0.3),
    st.floats(0.5, 0.99),
)
@example(layers=[(1, 1.0)], target=0.0, lo=1.8556827610608074e-10, hi=0.5)  # a floor a rounding above the target
def test_capacity_allocation_properties(layers, target, lo, hi):
    """Random sizes / importances / bounds: the total is met (or refused as unreachable), bounds and
    monotonicity hold."""
    from onnxprune.analysis.layers import Layer

    units = [
        allocation.Allocatable(name=f"l{i}", n=n, flops=n, importance=imp, lo=lo, hi=hi,
                        layer=Layer(f"l{i}", "MatMul", "w", (n, 1), n, n))
        for i, (n, imp) in enumerate(layers)
    ]
    try:
        s = allocation.allocate_sparsities(units, "capacity", target)
    except InputError:
        assert not lo - 1e-9 <= target <= hi + 1e-9
        return
    n = np.array([u.n for u in units], float)
    assert abs(float(np.dot(n, s) / n.sum()) - target) < 1e-6
    assert np.all(s >= lo - 1e-9) and np.all(s <= hi + 1e-9)
    imp = np.array([u.importance for u in units])
    order = np.argsort(imp)
    assert np.all(np.diff(s[order]) <= 1e-9)


def test_unreachable_and_bad_targets(r56):
    with pytest.raises(InputError, match="cannot be met"):
        api.allocate(r56, target_sparsity=0.9, method="uniform", max_sparsity=0.5)
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        api.allocate(r56, target_sparsity=1.0, method="uniform")
    with pytest.raises(InputError, match="needs --scores"):
        api.allocate(r56, target_sparsity=0.5, method="capacity")
    with pytest.raises(InputError, match="unknown layer"):
        api.allocate(r56, target_sparsity=0.5, method="uniform", keep_dense=["nope"])


# --- scoring ----------------------------------------------------------------------------------------------


def test_capacity_metrics_match_numpy(r56, r56_weights):
    layer = onnxprune.inspect(r56).layers[5]
    w = r56_weights[layer.name].reshape(layer.weight_shape[0], -1).astype(np.float64)
    sigma = np.linalg.svd(w, compute_uv=False)
    p = sigma / sigma.sum()
    expected = {
        "mean_abs": np.abs(w).mean(),
        "l2": np.sqrt((w**2).mean()),
        "effective_rank": np.exp(-(p * np.log(p)).sum()) / min(w.shape),
        "stable_rank": (w**2).sum() / sigma[0] ** 2 / min(w.shape),
    }
    for metric, value in expected.items():
        scores = api.score(r56, metric=metric)
        unit = scores.by_name()[layer.name]
        assert unit["metrics"][metric] == pytest.approx(value, rel=1e-5), metric
        assert max(u["importance"] for u in scores.units) == pytest.approx(1.0)
        assert scores.metric == metric and scores.fingerprint == onnxprune.inspect(r56).fingerprint


def test_randomized_rank_is_close_to_exact(monkeypatch):
    from onnxprune.scoring import capacity

    rng = np.random.default_rng(0)
    m = (rng.standard_normal((600, 40)) @ rng.standard_normal((40, 700)) + 0.1 * rng.standard_normal((600, 700)))
    exact_sigma, energy, exact = capacity.singular_values(m)
    assert exact
    monkeypatch.setattr(capacity, "EXACT_RANK_LIMIT", 100)
    monkeypatch.setattr(capacity, "RANDOMIZED_K", 64)
    approx_sigma, energy2, exact2 = capacity.singular_values(m)
    assert not exact2
    assert approx_sigma[0] == pytest.approx(exact_sigma[0], rel=1e-3)  # stable rank needs only sigma_max
    er_exact = capacity.effective_rank_fraction(exact_sigma, energy, 600, True)
    er_approx = capacity.effective_rank_fraction(approx_sigma, energy2, 600, False)
    assert er_approx == pytest.approx(er_exact, rel=0.15)


# --- apply ------------------------------------------------------------------------------------------------


def test_unstructured_masks_equal_independent_numpy(r56, r56_weights, capacity_scores, tmp_path):
    plan = api.allocate(r56, target_sparsity=0.8, method="capacity", scores=capacity_scores)
    out = api.apply(r56, plan, tmp_path / "p.onnx")
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out.path)).graph.initializer}
    info = {layer.name: layer for layer in onnxprune.inspect(r56).layers}
    for e in plan.layers:
        w = r56_weights[e["name"]]
        flat = np.abs(w).reshape(-1)
        mask = np.ones(flat.size)
        mask[np.argsort(flat, kind="stable")[: e["zeros"]]] = 0
        np.testing.assert_array_equal(pruned[info[e["name"]].weight], w * mask.reshape(w.shape))
    assert out.totals["params_sparsity"] == plan.totals["params_sparsity"]
    assert out.totals["zeros"] == plan.totals["zeros"]


def test_nm_pattern_holds_in_every_group(r56, r56_weights, tmp_path):
    plan = api.allocate(r56, target_sparsity=0.5, method="uniform")
    out = api.apply(r56, plan, tmp_path / "nm.onnx", granularity="n:m", nm=(2, 4))
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out.path)).graph.initializer}
    info = {layer.name: layer for layer in onnxprune.inspect(r56).layers}
    assert list(out.skipped) == [info_name for info_name in info if info[info_name].weight_shape[1] % 4][:1]
    checked = 0
    for name, layer in info.items():
        if name in out.skipped:
            continue
        w, p = r56_weights[name], pruned[layer.weight]
        if layer.op_type == "Conv":  # groups of 4 along the input channels
            g_w = np.moveaxis(w, 1, -1).reshape(-1, 4)
            g_p = np.moveaxis(p, 1, -1).reshape(-1, 4)
        else:  # Gemm with transB=1: input features on axis 1
            g_w, g_p = w.reshape(-1, 4), p.reshape(-1, 4)
        assert np.all((g_p != 0).sum(axis=1) <= 2)
        # the kept ones are the 2 largest of each group
        top2 = np.sort(np.abs(g_w), axis=1)[:, 2:]
        np.testing.assert_array_equal(np.sort(np.abs(g_p), axis=1)[:, 2:], top2)
        checked += 1
    assert checked == len(info) - 1  # only the stem conv (3 input channels) stays dense


def test_zero_plan_is_bit_identical(r56, cifar_lossless, tmp_path):
    plan = api.allocate(r56, target_sparsity=0.0, method="uniform")
    out = api.apply(r56, plan, tmp_path / "zero.onnx")
    x = np.load(cifar_lossless)["x"][:64].astype(np.float32) / 255
    a = ort.InferenceSession(str(r56)).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(out.path)).run(None, {"input": x})[0]
    assert np.array_equal(a, b)


def test_sparse_store_shrinks_file_same_outputs(r56, tmp_path):
    plan = api.allocate(r56, target_sparsity=0.9, method="lamp")
    dense = api.apply(r56, plan, tmp_path / "dense.onnx")
    sparse = api.apply(r56, plan, tmp_path / "sparse.onnx", store="sparse")
    assert sparse.output_bytes < 0.4 * dense.output_bytes
    assert len(onnx.load(str(sparse.path)).graph.sparse_initializer) == len(sparse.sparse_initializers) > 40
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(str(dense.path)).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(sparse.path)).run(None, {"input": x})[0]
    assert np.array_equal(a, b)
    # and onnxprune reads its own sparse file back (onnx-ir alone drops sparse initializers)
    back, ref = api.inspect(sparse.path), api.inspect(dense.path)
    assert (len(back.layers), back.params, back.flops) == (len(ref.layers), ref.params, ref.flops)


def test_constant_node_weights_and_external_data(export, tmp_path):
    src = initializers_to_constants(export("resnet-proj"), tmp_path / "const.onnx")
    plan = api.allocate(src, target_sparsity=0.5, method="uniform")
    out = api.apply(src, plan, tmp_path / "pruned.onnx", external_data=True)
    assert (tmp_path / "pruned.onnx.data").exists() or out.totals["zeros"] > 0
    model = load_model(out.path)
    zeros = sum(int((np.asarray(n.attributes["value"].as_tensor().numpy()) == 0).sum())
                for n in model.graph if n.op_type == "Constant" and n.attributes.get("value") is not None)
    assert zeros >= plan.totals["zeros"]


# --- refusals and the CLI pipeline ------------------------------------------------------------------------


def test_plan_for_another_model_refused(export, r56, tmp_path):
    plan_path = write_json(api.allocate(r56, target_sparsity=0.5, method="uniform").to_dict(), tmp_path / "p.json")
    other = export("resnet56", dynamo=True)
    proc = run_cli("apply", other, plan_path, "-o", tmp_path / "o.onnx", rc=2)
    assert "made for another model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()
    # names differ between the two exports, so --force still refuses, naming the layers
    proc = run_cli("apply", other, plan_path, "-o", tmp_path / "o.onnx", "--force", rc=2)
    assert "not in the model" in proc.stderr


def test_scores_for_another_model_refused(export, r56, capacity_scores, tmp_path):
    path = write_json(capacity_scores.to_dict(), tmp_path / "s.json")
    proc = run_cli("allocate", export("resnet56", keep_bn=True), "--scores", path, "--target-sparsity", "0.5",
                   "-o", tmp_path / "p.json", rc=2)
    assert "scores file was made for another model" in proc.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [("not json", "not valid JSON"), ('{"schema": "x"}', "expected 'onnxprune.plan/1'"),
     ('{"schema": "onnxprune.plan/1", "layers": [{"name": "a", "sparsity": 1.5}]}', "must be in [0, 1)")],
)
def test_bad_plan_files(r56, tmp_path, content, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = run_cli("apply", r56, bad, "-o", tmp_path / "o.onnx", rc=2)
    assert fragment in proc.stderr and not (tmp_path / "o.onnx").exists()


def test_pipeline_on_resnet56(r56, cifar_lossless, tmp_path):
    """The CLI end to end; LAMP and uniform at 70 % reproduce the known one-shot accuracies."""
    run_cli("score", r56, "--method", "capacity", "-o", tmp_path / "scores.json")
    accuracies = {}
    for method in ("lamp", "uniform", "capacity"):
        plan = tmp_path / f"{method}.json"
        run_cli("allocate", r56, "--scores", tmp_path / "scores.json", "--target-sparsity", "0.7",
                "--method", method, "-o", plan)
        assert abs(load_plan(plan).totals["params_sparsity"] - 0.7) <= 0.001
        proc = run_cli("apply", r56, plan, "-o", tmp_path / f"{method}.onnx", "--json")
        assert json.loads(proc.stdout)["totals"]["params_sparsity"] == pytest.approx(0.7, abs=0.001)
        res = onnxprune.eval(tmp_path / f"{method}.onnx", cifar_lossless, mean=CIFAR_MEAN, std=CIFAR_STD)
        accuracies[method] = res.top1
    assert accuracies["lamp"] == pytest.approx(78.4, abs=1.5)
    assert accuracies["uniform"] == pytest.approx(53.4, abs=1.5)


@pytest.mark.parametrize("method", ["lamp", "global"])
def test_big_layer_sketch_stays_close_to_exact(r56, monkeypatch, method):
    """Big layers keep a sketch of their sorted scores (memory): with the sketch forced onto ResNet-56's
    layers at a coarse 256 points, each layer's zero count stays within 1/256 of its size of the exact one."""
    from onnxprune.planning import allocation

    exact = {e["name"]: e for e in api.allocate(r56, target_sparsity=0.7, method=method).layers}
    monkeypatch.setattr(allocation, "SKETCH_ABOVE", 1000)
    monkeypatch.setattr(allocation, "SKETCH", 256)
    sketched = api.allocate(r56, target_sparsity=0.7, method=method)
    assert abs(sketched.totals["params_sparsity"] - 0.7) <= 0.001
    big = [e for e in sketched.layers if e["params"] > 1000]
    assert big and all(abs(e["zeros"] - exact[e["name"]]["zeros"]) <= e["params"] / 256 + 2 for e in big)
    assert any(e["zeros"] != exact[e["name"]]["zeros"] for e in big)  # the sketch really was used


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=64), st.data())
def test_linear_time_mask_equals_stable_argsort(values, data):
    """magnitude_mask (partition + ties in order) zeroes exactly the first k of a stable argsort of |w|."""
    from onnxprune.tensors.masks import magnitude_mask

    w = np.array(values, np.float32)
    k = data.draw(st.integers(0, w.size))
    expected = np.ones(w.size, bool)
    expected[np.argsort(np.abs(w), kind="stable")[:k]] = False
    np.testing.assert_array_equal(magnitude_mask(w, k), expected)
