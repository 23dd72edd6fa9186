"""Layer and residual-block discovery on real exports (ResNet-56 of the shared data, three exporters),
transformers (pre- and post-norm), projection shortcuts, Constant-node weights, hand-made edge cases."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from onnx import helper

import onnxprune
from models.resnet_cifar import load_pretrained
from tests.graphs import add_to_sum, initializers_to_constants, make_model, tensor, weights

R56_TORCH_PARAMS = 853_018  # published and counted by torch
R56_BN_CHANNELS = 16 + 18 * (16 + 32 + 64)  # every BatchNorm channel of ResNet-56


def torch_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Independent oracle: 2 x MACs per sample of every Conv2d / Linear, from forward hooks."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += 2 * out[0].numel() * mod.weight[0].numel()
        else:
            total += 2 * out[0].numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    return total


@pytest.fixture(scope="module")
def r56_flops() -> int:
    return torch_flops(load_pretrained(56), torch.zeros(1, 3, 32, 32))


def _check_resnet56(info: onnxprune.InspectResult, flops: int) -> None:
    assert Counter(layer.op_type for layer in info.layers) == {"Conv": 55, "Gemm": 1}
    assert info.flops == flops
    assert len(info.blocks) == 27
    assert Counter(b.skip for b in info.blocks) == {"identity": 25, "parameter-free": 2}
    assert all(b.removable for b in info.blocks)
    assert all(len(b.layers) == 2 for b in info.blocks)
    # the parameter-free (Slice/Pad) skips are the first blocks of stages 2 and 3
    assert [i for i, b in enumerate(info.blocks) if b.skip == "parameter-free"] == [9, 18]
    # every layer except the stem conv and the classifier belongs to exactly one block
    in_blocks = [name for b in info.blocks for name in b.layers]
    assert len(in_blocks) == len(set(in_blocks)) == 54
    assert {info.layers[0].name, info.layers[-1].name}.isdisjoint(in_blocks)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_resnet56_folded_exports(export, r56_flops, dynamo):
    info = onnxprune.inspect(export("resnet56", dynamo=dynamo))
    _check_resnet56(info, r56_flops)
    # BN folded into the convs: each BN channel's scale and shift (2 parameters) became 1 conv bias
    assert info.params == info.prunable_params == R56_TORCH_PARAMS - R56_BN_CHANNELS == 850_986
    assert all(layer.bn is None for layer in info.layers)


def test_resnet56_with_batchnorm_counts_torch_params(export, r56_flops):
    info = onnxprune.inspect(export("resnet56", keep_bn=True))
    _check_resnet56(info, r56_flops)
    assert info.params == info.prunable_params == R56_TORCH_PARAMS
    assert sum(p.numel() for p in load_pretrained(56).parameters()) == R56_TORCH_PARAMS
    assert all(layer.bn for layer in info.layers if layer.op_type == "Conv")
    # block names follow the torch module names of the TorchScript export
    assert [b.name.split("/")[2] for b in info.blocks[:3]] == ["layer1.0", "layer1.1", "layer1.2"]


def test_opset9_style_graph_constants_and_sum(export, tmp_path, r56_flops):
    """Weights from Constant nodes and residuals joined by Sum (older exporters)."""
    src = export("resnet56", keep_bn=True)
    const = initializers_to_constants(src, tmp_path / "const.onnx")
    summed = add_to_sum(const, tmp_path / "const_sum.onnx")
    assert Counter(n.op_type for n in onnx.load(str(summed)).graph.node)["Sum"] == 27
    info = onnxprune.inspect(summed)
    _check_resnet56(info, r56_flops)
    assert info.params == R56_TORCH_PARAMS


@pytest.mark.parametrize("name", ["transformer-pre", "transformer-post"])
def test_transformer_blocks(export, name):
    info = onnxprune.inspect(export(name))
    layers = {layer.name: layer for layer in info.layers}
    # embed + 2 x (q, k, v, out, fc1, fc2) as MatMul with their bias Add, the head (after pooling) a Gemm
    assert [layer.op_type for layer in info.layers] == ["MatMul"] * 13 + ["Gemm"]
    assert all(layer.bias for layer in info.layers)
    assert len(info.blocks) == 4
    assert [len(b.layers) for b in info.blocks] == [4, 2, 4, 2]  # attention, MLP, attention, MLP
    assert all(b.skip == "identity" and b.removable for b in info.blocks)
    assert {layers[n].op_type for b in info.blocks for n in b.layers} == {"MatMul"}
    model = onnx.load(str(export(name)))
    ops = {n.name: n.op_type for n in model.graph.node}
    for block in info.blocks:
        has_norm = any(ops[n] == "LayerNormalization" for n in block.nodes)
        # pre-norm: x + f(LN(x)) has the norm inside the branch; post-norm: LN(x + f(x)) has it after the join
        assert has_norm == (name == "transformer-pre")
    # the attention's activation x activation MatMuls (Q K^T, A V) are not prunable layers
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 13 + 4


def test_projection_shortcut(export):
    info = onnxprune.inspect(export("resnet-proj"))
    assert [b.skip for b in info.blocks] == ["identity", "projection", "identity"]
    proj = info.blocks[1]
    assert len(proj.skip_layers) == 1 and len(proj.layers) == 2
    assert proj.removable  # dropping the branch leaves the projection path, whose shape fits


def test_plain_networks_have_no_blocks(export):
    cnn = onnxprune.inspect(export("cnn"))
    assert [layer.op_type for layer in cnn.layers] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert cnn.blocks == []
    mlp = onnxprune.inspect(export("mlp"))
    assert [layer.op_type for layer in mlp.layers] == ["Gemm"] * 3
    assert mlp.params == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_shared_weight_counted_once(tmp_path):
    w = weights("W", 8, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
    ]
    path = tmp_path / "shared.onnx"
    onnx.save(make_model(nodes, [tensor("x", "batch", 8)], [tensor("y", "batch", 8)], [w]), str(path))
    info = onnxprune.inspect(path)
    assert [layer.params for layer in info.layers] == [64, 0]
    assert info.layers[1].shared_with == "first"
    assert info.params == info.prunable_params == 64
    assert [layer.flops for layer in info.layers] == [128, 128]


def test_blocks_that_cannot_be_removed(tmp_path):
    """A branch value used outside the block; and an addend broadcast over the output (here (batch, 1) +
    (batch, 8)) is no skip path at all (an attention mask added to the scores is one), so no block."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["b"], name="fc2"),
        helper.make_node("Add", ["x", "b"], ["y"], name="join"),
        helper.make_node("MatMul", ["x", "W3"], ["n"], name="narrow"),
        helper.make_node("MatMul", ["n", "W4"], ["wide"], name="widen"),
        helper.make_node("Add", ["n", "wide"], ["z"], name="broadcast_join"),
    ]
    inits = [weights("W1", 8, 8), weights("W2", 8, 8), weights("W3", 8, 1), weights("W4", 1, 8)]
    path = tmp_path / "blocks.onnx"
    model = make_model(nodes, [tensor("x", "batch", 8)], [tensor("y", "batch", 8), tensor("r", "batch", 8),
                                                          tensor("z", "batch", 8)], inits)
    onnx.save(model, str(path))
    blocks = {b.name: b for b in onnxprune.inspect(path).blocks}
    assert not blocks["join"].removable and "graph output" in blocks["join"].reason
    assert "broadcast_join" not in blocks


def test_bias_add_and_constant_adds_are_not_blocks(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "B"], ["y"], name="bias"),
    ]
    path = tmp_path / "bias.onnx"
    onnx.save(make_model(nodes, [tensor("x", "batch", 8)], [tensor("y", "batch", 4)],
                         [weights("W", 8, 4), weights("B", 4)]), str(path))
    info = onnxprune.inspect(path)
    assert info.blocks == []
    assert info.layers[0].bias == "B" and info.layers[0].params == 36


def test_conv_transpose_and_grouped_flops(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["d", "Wt"], ["y"], name="up", strides=[2, 2]),
    ]
    path = tmp_path / "convt.onnx"
    onnx.save(make_model(nodes, [tensor("x", "batch", 4, 5, 5)], [tensor("y", "batch", 2, 10, 10)],
                         [weights("Wd", 4, 1, 3, 3), weights("Wt", 4, 2, 2, 2)]), str(path))
    dw, up = onnxprune.inspect(path).layers
    assert dw.groups == 4 and dw.flops == 2 * (4 * 5 * 5) * 9
    # each input element is multiplied into Cout x kh x kw outputs
    assert up.flops == 2 * (4 * 5 * 5) * (2 * 2 * 2)


def test_real_bert_minilm(minilm):
    """all-MiniLM-L6-v2 (post-norm BERT, exported by torch): 6 attention + 6 MLP blocks, all removable; the
    attention-mask Add is not a block; side computations (Shape, IsNaN) inside attention do not block removal."""
    from models.minilm import load_minilm

    info = onnxprune.inspect(minilm)
    assert [layer.op_type for layer in info.layers] == ["MatMul"] * 36
    assert [len(b.layers) for b in info.blocks] == [4, 2] * 6
    assert all(b.skip == "identity" and b.removable for b in info.blocks)
    assert all(b.name.endswith(("attention/output/Add", "/output/Add")) for b in info.blocks)
    torch_params = sum(p.numel() for p in load_minilm().parameters())
    pooler = 384 * 384 + 384  # not on the path to last_hidden_state, so not in the graph
    assert info.params == torch_params - pooler
    assert info.prunable_params == 6 * (4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384)
    assert any("seq" in note for note in info.notes)
