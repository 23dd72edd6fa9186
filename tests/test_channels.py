"""Structured channel removal against the zero-mask oracle, on real exported models and generated graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune import api
from onnxprune.analysis.channels import channel_graph
from onnxprune.analysis.graph import analyse_graph, fold_small_constants
from onnxprune.analysis.layers import find_layers
from onnxprune.passes.shrink import choose, shrink
from tests.graphs import mask_channels


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
    proto = fold_small_constants(proto)
    m = ir.serde.deserialize_model(proto)
    info = analyse_graph(m)
    layers = find_layers(info)
    cg = channel_graph(info, layers)
    remove, _ = choose(cg, ratios if isinstance(ratios, dict) else {layer.name: ratios for layer in layers},
                       criterion, round_to)
    masks = {}
    for name, elems in cg.produced.items():
        mask = np.array([cg.find(e) not in remove for e in elems], np.float32)
        if mask.min() < 1:
            value, rank, axis = _tail(cg.layers[name], m, info)
            masks[value] = (rank, axis, mask)
    masked = mask_channels(ir.serde.serialize_model(m), masks)
    shrink(m, cg, remove)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(m)
    shrunk = ir.serde.serialize_model(m)
    onnx.checker.check_model(shrunk, full_check=True)
    return shrunk.SerializeToString(), masked.SerializeToString(), len(remove)


def _run(model_bytes, x):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("name,keep_bn", [("resnet56", False), ("resnet56", True), ("resnet-proj", False),
                                          ("cnn", False), ("mlp", False), ("transformer-pre", False)])
def test_shrunk_equals_masked_original(export, cifar_lossless, digits_npz, name, keep_bn):
    path = export(name, keep_bn=keep_bn) if keep_bn else export(name)
    if name.startswith("resnet56"):
        x = np.load(cifar_lossless)["x"][:16].astype(np.float32) / 255
    else:
        x = np.load(digits_npz)["x"][:16].astype(np.float32) / 255
    shrunk, masked, removed = shrink_vs_mask(onnx.load(str(path)), 0.4)
    assert removed > 0
    np.testing.assert_allclose(_run(shrunk, x), _run(masked, x), atol=1e-4, rtol=1e-4)


def test_resnet56_channel_plan_is_fully_coupled_and_halves_flops(export, tmp_path):
    """ResNet-56 (option-A shortcuts): every residual stream is one coupled group across the three stages
    through the channel Pad, nothing is blocked but the classifier output; 30 % of channels removes ~46 %
    of the FLOPs (inputs and outputs both shrink)."""
    path = export("resnet56")
    plan = api.allocate(path, method="uniform", target_sparsity=0.3)
    out = api.apply(path, plan, tmp_path / "ch.onnx", granularity="channel")
    t = out.totals
    assert t["groups_blocked"] == 1 and list(out.skipped.values()) == ["graph output 'logits' keeps its shape"]
    assert 0.40 < t["flops_fraction_removed"] < 0.55
    after = onnxprune.inspect(out.path)
    assert after.flops == t["flops_after"] and after.params == t["params_after"] < t["params_before"]
    assert all(layer["channels_after"] >= 1 for layer in out.layers)


def test_round_to_keeps_multiples(export, tmp_path):
    path = export("resnet56")
    plan = api.allocate(path, method="uniform", target_sparsity=0.3)
    out = api.apply(path, plan, tmp_path / "ch8.onnx", granularity="channel", round_to=8)
    assert all(layer["channels_after"] % 8 == 0 for layer in out.layers if layer["channels_after"] != layer["channels"])
