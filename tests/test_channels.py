"""Structured channel removal against the zero-mask oracle, on real exported models and generated graphs."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxprune
from onnxprune import api
from onnxprune.passes import ShrinkChannelsPass, run_passes
from onnxprune.planning.channel_selection import choose
from onnxprune.verbs.loading import open_model
from tests.graphs import make_model, mask_channels, tensor, weights


def _tail(layer, model: ir.Model, info) -> tuple[str, int, int]:
    """The value after a layer and its per-channel affine tail (bias Add, BatchNorm): name, rank, channel axis."""
    value = layer.node.outputs[0]
    if layer.bn is not None:
        value = next(n for n in model.graph if n.name == layer.bn).outputs[0]
    elif layer.op_type == "MatMul" and layer.bias is not None:
        value = next(u.node for u in value.uses() if u.node.op_type == "Add").outputs[0]
    rank = len(info.shape(value))
    return value.name, rank, (1 if layer.op_type in ("Conv", "ConvTranspose", "Gemm") else rank - 1)


def shrink_vs_mask(proto: onnx.ModelProto, ratios, criterion="l2", round_to=1):
    """(shrunk model bytes, masked original bytes, channels removed)."""
    am = open_model(ir.serde.deserialize_model(proto))
    m, info, layers, cg = am.model, am.info, am.layers, am.channel_graph()
    remove, _ = choose(cg, ratios if isinstance(ratios, dict) else {layer.name: ratios for layer in layers},
                       criterion, round_to)
    masks = {}
    by_node = {layer.node: layer for layer in cg.layers.values()}
    for edit in cg.edits:  # every layer that outputs channels: producers and depthwise layers alike
        if edit.kind != "weight_out":
            continue
        mask = np.array([cg.find(e) not in remove for e in edit.elems], np.float32)
        if mask.min() < 1:
            value, rank, axis = _tail(by_node[edit.node], m, info)
            masks[value] = (rank, axis, mask)
    masked = mask_channels(ir.serde.serialize_model(m), masks)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    run_passes(m, [ShrinkChannelsPass(cg, remove), RemoveUnusedNodesPass()])
    shrunk = ir.serde.serialize_model(m)
    onnx.checker.check_model(shrunk, full_check=True)
    return shrunk.SerializeToString(), masked.SerializeToString(), len(remove)


def _run(model_bytes, x):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("name,keep_bn", [("resnet56", False), ("resnet56", True), ("resnet-proj", False),
                                          ("cnn", False), ("mlp", False), ("transformer-pre", False),
                                          ("transformer-post", False)])
def test_shrunk_equals_masked_original(export, cifar_lossless, digits_npz, name, keep_bn):
    path = export(name, keep_bn=keep_bn) if keep_bn else export(name)
    if name.startswith("resnet56"):
        x = np.load(cifar_lossless)["x"][:16].astype(np.float32) / 255
    else:
        x = np.load(digits_npz)["x"][:16].astype(np.float32) / 255
    shrunk, masked, removed = shrink_vs_mask(onnx.load(str(path)), 0.4)
    assert removed > 0
    np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-4, rtol=1e-4)


def as_channel_plan(plan):
    """A hand-made channel plan: every layer's sparsity taken as its fraction of channels to remove (what
    allocate --granularity channel writes, without scaling it to a budget)."""
    return dataclasses.replace(plan, granularity="channel")


def test_resnet56_channel_plan_is_fully_coupled_and_halves_flops(export, tmp_path):
    """ResNet-56 (option-A shortcuts): every residual stream is one coupled group across the three stages
    through the channel Pad, nothing is blocked but the classifier output; 30 % of channels removes ~46 %
    of the FLOPs (inputs and outputs both shrink)."""
    path = export("resnet56")
    plan = as_channel_plan(api.allocate(path, method="uniform", target_sparsity=0.3))
    out = api.apply(path, plan, tmp_path / "ch.onnx")
    t = out.totals
    assert t["groups_blocked"] == 1 and list(out.skipped.values()) == ["graph output 'logits' keeps its shape"]
    assert 0.40 < t["flops_fraction_removed"] < 0.55
    after = onnxprune.inspect(out.path)
    assert after.flops == t["flops_after"] and after.params == t["params_after"] < t["params_before"]
    assert all(layer["channels_after"] >= 1 for layer in out.layers)


def test_round_to_keeps_multiples(export, tmp_path):
    path = export("resnet56")
    plan = as_channel_plan(api.allocate(path, method="uniform", target_sparsity=0.3))
    out = api.apply(path, plan, tmp_path / "ch8.onnx", round_to=8)
    assert all(layer["channels_after"] % 8 == 0 for layer in out.layers if layer["channels_after"] != layer["channels"])


@st.composite
def random_graphs(draw) -> onnx.ModelProto:
    """A CNN mixing Conv, depthwise and grouped Conv, BatchNorm, Relu, residual Add, Concat, MaxPool and
    Flatten -> Gemm, with random widths (multiples of 2), weights at He scale (activations of order 1, as in
    a trained network, so that 1e-4 is float32 round-off and not a scale effect)."""

    nodes, inits = [], []
    rng_seed = draw(st.integers(0, 10_000))
    k = [0]

    def name(prefix):
        k[0] += 1
        return f"{prefix}{k[0]}"

    def conv(x, cin, cout, group=1, ksize=3):
        w = name("w")
        inits.append(weights(w, cout, cin // group, ksize, ksize, seed=rng_seed + k[0],
                             scale=np.sqrt(2 / (cin // group * ksize * ksize))))
        b = name("b")
        inits.append(weights(b, cout, seed=rng_seed + 7 * k[0]))
        y = name("conv")
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=y, pads=[ksize // 2] * 4, group=group))
        return y

    def bn(x, c):
        names = [name(p) for p in ("s", "sh", "m", "v")]
        rng = np.random.default_rng(rng_seed + k[0])
        for n_, arr in zip(names, (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                                   rng.uniform(0.5, 1.5, c)), strict=True):
            inits.append(onnx.numpy_helper.from_array(arr.astype(np.float32), n_))
        y = name("bn")
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=y))
        return y

    def relu(x):
        y = name("relu")
        nodes.append(helper.make_node("Relu", [x], [y], name=y))
        return y

    c = 2 * draw(st.integers(2, 6))
    x = relu(conv("input", 3, c))
    side = 8
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "bn", "residual", "depthwise", "grouped", "concat", "pool"]))
        if kind == "plain":
            c2 = 2 * draw(st.integers(2, 6))
            x, c = relu(conv(x, c, c2)), c2
        elif kind == "bn":
            x = relu(bn(conv(x, c, c), c))
        elif kind == "residual":
            y = conv(relu(conv(x, c, c)), c, c)
            s = name("add")
            nodes.append(helper.make_node("Add", [x, y], [s], name=s))
            x = relu(s)
        elif kind == "depthwise":
            x = relu(conv(x, c, c, group=c))
        elif kind == "grouped":
            x = relu(conv(x, c, c, group=2))
        elif kind == "concat":
            c2 = 2 * draw(st.integers(1, 4))
            a, b_ = relu(conv(x, c, c2)), relu(conv(x, c, c2, ksize=1))
            y = name("cat")
            nodes.append(helper.make_node("Concat", [a, b_, x], [y], name=y, axis=1))
            x, c = y, 2 * c2 + c
        elif side > 1:  # a fourth 2x2 pool of the 8 x 8 input would leave nothing
            y = name("pool")
            nodes.append(helper.make_node("MaxPool", [x], [y], name=y, kernel_shape=[2, 2], strides=[2, 2]))
            x, side = y, side // 2
    f = name("flat")
    nodes.append(helper.make_node("Flatten", [x], [f], name=f, axis=1))
    w = name("fcw")
    inits.append(weights(w, c * side * side, 5, seed=rng_seed, scale=np.sqrt(1 / (c * side * side))))
    nodes.append(helper.make_node("Gemm", [f, w], ["logits"], name="fc"))
    return make_model(nodes, [tensor("input", "N", 3, 8, 8)], [tensor("logits", "N", 5)], inits)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.floats(0.1, 0.8), st.sampled_from(["l1", "l2"]), st.sampled_from([1, 2]))
def test_random_graphs_shrink_exactly(proto, ratio, criterion, round_to):
    """Property: on generated graphs every shrunk model passes onnx.checker (full) and ONNX Runtime, and
    equals the original with the removed channels zeroed after their layers."""
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    shrunk, masked, _ = shrink_vs_mask(proto, ratio, criterion, round_to)
    np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["transformer-pre", "transformer-post"])
def test_attention_heads_go_whole(export, digits_npz, tmp_path, name):
    """q, k and v of a layer form one group of 4 heads (each head's 8 features tied); removing half the
    heads rewrites the reshape targets (head count and merged width), shrinks q/k/v outputs and the output
    projection's input, and the model still runs; the MLP hidden width is its own group."""
    path = export(name)
    groups = {tuple(g["layers"]): g for g in onnxprune.inspect(path).groups}
    for i in range(2):
        qkv = tuple(f"/layers.{i}/attn/{p}/MatMul" for p in ("k", "q", "v"))
        assert groups[qkv]["prunable"] and groups[qkv]["channels"] == 4
        assert groups[(f"/layers.{i}/fc1/MatMul",)]["channels"] == 64
    plan = as_channel_plan(api.allocate(path, method="uniform", target_sparsity=0.5))
    out = api.apply(path, plan, tmp_path / "heads.onnx")
    by = {layer["name"]: layer for layer in out.layers}
    for i in range(2):
        for p in ("q", "k", "v"):
            assert by[f"/layers.{i}/attn/{p}/MatMul"]["channels_after"] == 16  # 2 of 4 heads of 8
    shrunk = onnx.load(str(out.path))
    w = {t.name: t.dims for t in shrunk.graph.initializer}
    out_proj = next(n for n in shrunk.graph.node if n.name == "/layers.0/attn/out/MatMul")
    assert list(w[out_proj.input[1]]) == [16, 32]
    x = np.load(digits_npz)["x"][:5].astype(np.float32) / 255
    assert _run(shrunk.SerializeToString(), x).shape == (5, 10)


@pytest.mark.parametrize("coupled", ["prune", "keep"])
def test_round_to_meets_flop_target_and_apply_matches_plan(export, tmp_path, coupled):
    """--round-to 8 still reaches the FLOP target (counts rounded group by group, not all at once), apply
    removes exactly the plan's counts, and --coupled keep leaves the residual streams whole."""
    path = export("resnet56")
    plan = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.5,
                        round_to=8, coupled=coupled)
    assert plan.totals["flops_fraction_removed"] >= 0.5
    out = api.apply(path, plan, tmp_path / f"r8_{coupled}.onnx")
    assert out.totals["flops_after"] == plan.totals["flops_after"]
    assert out.totals["params_after"] == plan.totals["params_after"]
    assert all(layer["channels_after"] % 8 == 0 for layer in out.layers if layer["sparsity"] > 0)
    stream_writers = [layer for layer in out.layers if layer["name"].endswith("conv2/Conv")]
    if coupled == "keep":
        assert stream_writers and all(layer["sparsity"] == 0 for layer in stream_writers)


def test_patches_reproduce_conv():
    """The refit's least-squares rows (im2col) times the weight matrix equal ONNX Runtime's Conv, with stride
    and asymmetric pads."""
    from onnxprune.passes import reconstruct as rc

    w = weights("w", 6, 4, 3, 3, seed=1)
    b = weights("b", 6, seed=2)
    node = helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", strides=[2, 2], pads=[1, 0, 1, 1])
    proto = make_model([node], [tensor("input", 2, 4, 9, 9)], [tensor("y", 2, 6, 5, 4)], [w, b])
    m = ir.serde.deserialize_model(proto)
    layer = open_model(m).layers[0]
    x = np.random.default_rng(0).standard_normal((2, 4, 9, 9)).astype(np.float32)
    y = _run(proto.SerializeToString(), x)
    wa = onnx.numpy_helper.to_array(w)
    pred = rc.layer_rows(x, layer) @ rc._matrix(wa, layer) + onnx.numpy_helper.to_array(b)
    np.testing.assert_allclose(pred, rc.layer_targets(y, layer), atol=1e-4)
    np.testing.assert_array_equal(rc._unmatrix(rc._matrix(wa, layer), layer, wa.shape), wa)


def test_refit_recovers_accuracy(export, cifar_lossless, cifar_jpeg, tmp_path):
    """ResNet-56 at half its FLOPs (inner channels, multiples of 8): one-shot removal leaves ~10 % top-1; the
    least-squares refit on 64 calibration images (JPEG 1017.., disjoint from the lossless test images) lowers
    every refit layer's output error and brings top-1 far up, with the same shapes and FLOPs."""
    path = export("resnet56")
    plan = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.5,
                        round_to=8, coupled="keep")
    plain = api.apply(path, plan, tmp_path / "plain.onnx")
    refit = api.apply(path, plan, tmp_path / "refit.onnx", data=cifar_jpeg, offset=1017, limit=64)
    r = refit.totals["refit"]
    assert r["layers"] == 27 and r["samples"] == 64 and not r["skipped"]
    assert r["mean_error_after"] < 0.6 * r["mean_error_before"]
    assert refit.totals["flops_after"] == plain.totals["flops_after"]
    before = onnxprune.eval(plain.path, cifar_lossless, limit=256).top1
    after = onnxprune.eval(refit.path, cifar_lossless, limit=256).top1
    assert before < 30 and after > before + 30, (before, after)


def test_calibration_data_only_for_channels_and_data_criteria(export, digits_npz, tmp_path):
    from onnxprune.errors import InputError

    path = export("mlp")
    plan = api.allocate(path, method="uniform", target_sparsity=0.5)
    with pytest.raises(InputError, match="calibrates channel removal and the wanda / obs criteria"):
        api.apply(path, plan, tmp_path / "x.onnx", granularity="unstructured", data=digits_npz)
    assert not (tmp_path / "x.onnx").exists()


def test_real_bert_heads_and_mlp_shrink_exactly(minilm):
    """all-MiniLM-L6-v2 (HF export: Shape/Gather, IsNaN/Where and an attention mask whose head axis only
    ONNX Runtime's symbolic shape inference resolves): per layer 12 heads (q, k, v) and the 1,536-wide MLP
    are prunable, the residual stream is not (LayerNorm); removing half of each equals the original with
    those channels zeroed, on a padded batch."""
    proto = onnx.load(str(minilm))
    groups = {tuple(g["layers"]): g for g in onnxprune.inspect(minilm).groups}
    for i in range(6):
        attn = f"/bert/encoder/layer.{i}/attention/self/"
        heads = groups[tuple(attn + p + "/MatMul" for p in ("key", "query", "value"))]
        assert heads["prunable"] and heads["channels"] == 12
        assert groups[(f"/bert/encoder/layer.{i}/intermediate/dense/MatMul",)]["prunable"]
    shrunk, masked, removed = shrink_vs_mask(proto, 0.5)
    assert removed == 6 * (6 + 768)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(100, 20000, (2, 12)).astype(np.int64), "attention_mask": np.ones((2, 12), np.int64)}
    feeds["attention_mask"][1, 8:] = 0

    def run(b):
        return ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_allclose(run(shrunk), run(masked), atol=1e-4, rtol=1e-4)


def test_round_to_counts_whole_heads(export, tmp_path):
    """--round-to 8 on a transformer: a head of 8 features is already a multiple of 8, so heads still go
    (one at a time), and every pruned width is a multiple of 8."""
    path = export("transformer-pre")
    plan = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.4,
                        round_to=8)
    out = api.apply(path, plan, tmp_path / "r8.onnx")
    qkv = [layer for layer in out.layers if "/attn/" in layer["name"] and not layer["name"].endswith("out/MatMul")]
    assert any(layer["channels_after"] < layer["channels"] for layer in qkv)
    assert all(layer["channels_after"] % 8 == 0 for layer in out.layers if layer["sparsity"] > 0)
    assert plan.totals["flops_fraction_removed"] >= 0.4
