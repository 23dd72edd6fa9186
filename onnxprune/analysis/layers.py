"""Prunable layers: Conv, ConvTranspose, Gemm and MatMul nodes whose weight is a constant, the input (W)
and recurrent (R) weights of LSTM, GRU and RNN nodes (two layers per node, named NODE.W and NODE.R), and
ONNX Runtime's MatMulNBits (blockwise-quantised int4 weights; the layer's weight shape is the (K, N) matrix
they stand for, read and written through onnxprune.tensors.nbits).

For each: the weight tensor, its shape, the bias (Conv/Gemm input, or the Add of a constant after a MatMul),
the BatchNormalization that follows it if the graph still has one, the parameter count (weight + bias +
the BN's learnable scale and shift; running statistics are not parameters; a weight shared by several nodes
is counted once, at its first use) and FLOPs per sample (2 per multiply-accumulate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from onnxprune.analysis.graph import (
    FLOAT_TYPES,
    GraphInfo,
    const_shape,
    constant_source,
    node_bodies,
    numel,
    per_sample_count,
    stored_value,
)

__all__ = ["CHANNEL_OPS", "PRUNABLE_OPS", "RECURRENT_OPS", "Layer", "find_layers", "model_params", "nodes_in_scope",
           "out_in_axes"]

CHANNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits")  # layers whose channels the channel
# analysis follows
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # weights W (directions, gates x hidden, input), R (..., hidden)
PRUNABLE_OPS = CHANNEL_OPS + RECURRENT_OPS


@dataclass
class Layer:
    """A prunable layer. ``name`` is the node's name, unique in the graph."""

    name: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    params: int
    flops: int | None
    weight_input: int = 1  # which node input holds the weight
    bias: str | None = None
    bn: str | None = None
    groups: int = 1
    shared_with: str | None = None  # first layer using the same weight tensor
    scope: str | None = None  # the main-graph node (If, Loop, Scan) whose body holds the layer
    branch: str | None = None  # which of its bodies (then_branch, else_branch, body)
    node: ir.Node | None = field(default=None, repr=False, compare=False)

    @property
    def main_node(self) -> str:
        """The name of the main-graph node that runs this layer: its own, or the If / Loop / Scan around it."""
        return self.scope or self.node.name

    @property
    def main_nodes(self) -> list[str]:
        """The main-graph nodes a run with another weight must start from: ``main_node``, and the Cast /
        Identity nodes that convert a weight stored in another type (bfloat16) on its way to the layer."""
        names = [self.main_node]
        value = self.node.inputs[self.weight_input]
        while value is not stored_value(value):
            producer = value.producer()
            if producer.graph is self.node.graph and self.scope is None:
                names.append(producer.name)
            value = producer.inputs[0]
        return names

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "weight": self.weight,
            "weight_shape": list(self.weight_shape),
            "params": self.params,
            "flops": self.flops,
            "bias": self.bias,
            "bn": self.bn,
            "groups": self.groups,
            "shared_with": self.shared_with,
            "scope": self.scope,
            "branch": self.branch,
        }


def _weight_input(node: ir.Node) -> int | None:
    """Index of the constant weight input of a candidate node, or None if it has none."""
    ins = node.inputs
    if len(ins) < 2 or ins[1] is None:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1 if constant_source(ins[1]) is not None else None
    # Gemm / MatMul: the weight is whichever operand is constant (normally B)
    if constant_source(ins[1]) is not None and constant_source(ins[0]) is None:
        return 1
    if constant_source(ins[0]) is not None and constant_source(ins[1]) is None:
        return 0
    return None


def _single_consumer(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    users = {use.node for use in value.uses()}
    if len(users) != 1 or value in graph.outputs:
        return None
    return next(iter(users))


def _matmul_bias(node: ir.Node, graph: ir.Graph) -> tuple[ir.Value | None, ir.Node | None]:
    """For a MatMul, the constant of an ``Add(MatMul, const)`` that follows it (a Linear's bias), or the bias
    of an ONNX Runtime BiasGelu / FastGelu it feeds (then no node to continue from)."""
    nxt = _single_consumer(node.outputs[0], graph)
    if nxt is not None and nxt.op_type in ("BiasGelu", "FastGelu") and nxt.domain == "com.microsoft":
        bias = nxt.inputs[1] if len(nxt.inputs) > 1 else None  # ONNX Runtime fused the bias into the activation
        if bias is not None and constant_source(bias) is not None:
            return bias, None
        return None, None
    if nxt is None or nxt.op_type != "Add":
        return None, None
    other = [v for v in nxt.inputs if v is not node.outputs[0]]
    if len(other) == 1 and other[0] is not None and constant_source(other[0]) is not None:
        return other[0], nxt
    return None, None


def _flops(info: GraphInfo, node: ir.Node, w_shape: tuple[int, ...], w_idx: int) -> int | None:
    """2 x multiply-accumulates per sample, from inferred shapes."""
    out = per_sample_count(info.shape(node.outputs[0]), info.batch)
    if node.op_type == "Conv":
        return None if out is None else 2 * out * numel(w_shape[1:])
    if node.op_type == "ConvTranspose":
        inp = per_sample_count(info.shape(node.inputs[0]), info.batch)
        return None if inp is None else 2 * inp * numel(w_shape[1:])
    if node.op_type == "Gemm":
        trans = node.attributes.get_int("transB", 0) if w_idx == 1 else node.attributes.get_int("transA", 0)
        if w_idx == 1:
            k = w_shape[1] if trans else w_shape[0]
        else:
            k = w_shape[0] if trans else w_shape[1]
        return None if out is None else 2 * out * k
    # MatMul: x @ W with W (..., K, N), or W @ x with W (..., M, K)
    k = w_shape[-2] if w_idx == 1 else w_shape[-1]
    if len(w_shape) == 1:
        k = w_shape[0]
    return None if out is None else 2 * out * k


def _recurrent_layers(info: GraphInfo, node: ir.Node, first_use: dict[int, str]) -> list[Layer]:
    """The W and R weights of an LSTM / GRU / RNN node as two layers. FLOPs per sample: 2 x steps x
    directions x gates x hidden x (input size for W, hidden size for R); the bias (B) is counted with W."""
    layers = []
    x_shape = info.shape(node.inputs[0])  # (steps, batch, input), or (batch, steps, input) with layout 1
    per_sample = per_sample_count(x_shape, info.batch)
    steps = None if per_sample is None or not x_shape or not isinstance(x_shape[-1], int) else \
        per_sample // max(1, x_shape[-1])
    for w_idx, part in ((1, "W"), (2, "R")):
        value = node.inputs[w_idx] if len(node.inputs) > w_idx else None
        shape = const_shape(value) if value is not None and constant_source(value) is not None else None
        if shape is None or len(shape) != 3:
            continue
        key = id(constant_source(value))
        shared = first_use.get(key)
        first_use.setdefault(key, node.name)
        params = 0 if shared else numel(shape)
        bias = node.inputs[3] if part == "W" and len(node.inputs) > 3 and node.inputs[3] is not None else None
        if bias is not None and constant_source(bias) is not None and id(constant_source(bias)) not in first_use:
            first_use[id(constant_source(bias))] = node.name
            params += numel(const_shape(bias))
        else:
            bias = None
        flops = None if steps is None else 2 * steps * shape[0] * shape[1] * shape[2]
        layers.append(Layer(name=f"{node.name}.{part}", op_type=node.op_type, weight=stored_value(value).name,
                            weight_shape=shape,
                            params=params, flops=flops, weight_input=w_idx,
                            bias=bias.name if bias is not None else None, shared_with=shared, node=node))
    return layers


def nodes_in_scope(graph: ir.Graph):
    """(node, the main-graph node whose body holds it or None, the name of that body or None) for every
    node, If / Loop / Scan bodies included (right after the node that holds them)."""
    for node in graph:
        yield node, None, None
        for label, sub in node_bodies(node):
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                yield inner, node.name, label


def _nbits_layer(info: GraphInfo, node: ir.Node) -> Layer | None:
    """A MatMulNBits node with constant quantised weights, as the (K, N) layer it computes."""
    ins = node.inputs
    if len(ins) < 3 or any(v is None or constant_source(v) is None for v in ins[1:3]):
        return None
    k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
    if not k or not n:
        return None
    bias = ins[5] if len(ins) > 5 and ins[5] is not None and constant_source(ins[5]) is not None else None
    out = per_sample_count(info.shape(node.outputs[0]), info.batch)
    return Layer(name=node.name, op_type=node.op_type, weight=stored_value(ins[1]).name, weight_shape=(k, n),
                 params=k * n + (n if bias is not None else 0), flops=None if out is None else 2 * out * k,
                 weight_input=1, bias=None if bias is None else bias.name, node=node)


def find_layers(info: GraphInfo) -> list[Layer]:
    graph = info.graph
    layers: list[Layer] = []
    first_use: dict[int, str] = {}
    for node, scope, branch in nodes_in_scope(graph):
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            layer = _nbits_layer(info, node)
            if layer is not None:
                layer.scope, layer.branch = scope, branch
                layers.append(layer)
            continue
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in RECURRENT_OPS:
            found = _recurrent_layers(info, node, first_use)
            for layer in found:
                layer.scope, layer.branch = scope, branch
            layers.extend(found)
            continue
        w_idx = _weight_input(node)
        if w_idx is None:
            continue
        w_val = node.inputs[w_idx]
        w_shape = const_shape(w_val)
        if w_shape is None:
            continue
        if node.op_type == "MatMul" and len(w_shape) < 2:
            continue
        src = constant_source(w_val)
        key = id(src)
        shared = first_use.get(key)
        params = 0 if shared else numel(w_shape)
        first_use.setdefault(key, node.name)

        bias_val = None
        after = node
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
            if constant_source(node.inputs[2]) is not None:
                bias_val = node.inputs[2]
        elif node.op_type == "MatMul":
            bias_val, add = _matmul_bias(node, node.graph)
            if add is not None:
                after = add
        if bias_val is not None:
            b_key = id(constant_source(bias_val))
            if b_key not in first_use:
                first_use[b_key] = node.name
                params += numel(const_shape(bias_val))

        bn = None
        nxt = _single_consumer(after.outputs[0], node.graph)
        if nxt is not None and nxt.op_type == "BatchNormalization":
            bn = nxt.name
            for v in nxt.inputs[1:3]:  # scale, B: learnable; mean, var: statistics
                if v is not None and id(constant_source(v)) not in first_use:
                    first_use[id(constant_source(v))] = node.name
                    params += numel(const_shape(v))

        layers.append(
            Layer(
                name=node.name,
                op_type=node.op_type,
                weight=stored_value(w_val).name,
                weight_shape=w_shape,
                params=params,
                flops=_flops(info, node, w_shape, w_idx),
                weight_input=w_idx,
                bias=bias_val.name if bias_val is not None else None,
                bn=bn,
                groups=node.attributes.get_int("group", 1) if node.op_type.startswith("Conv") else 1,
                shared_with=shared,
                scope=scope,
                branch=branch,
                node=node,
            )
        )
    return layers


def model_params(info: GraphInfo) -> int:
    """All floating-point parameters of the model: initializers and Constant tensors of float type with more
    than one element, BatchNormalization running statistics excluded, each tensor counted once; a
    MatMulNBits weight counts K x N."""
    stats: set[int] = set()
    nodes = [node for node, _, _ in nodes_in_scope(info.graph)]
    total = 0
    for node in nodes:
        if node.op_type == "BatchNormalization":
            for v in node.inputs[3:5]:
                if v is not None and constant_source(v) is not None:
                    stats.add(id(constant_source(v)))
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            # the quantised matrix counts as the K x N weights it stands for, its scales as part of them
            total += node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0)
            for v in node.inputs[2:4]:
                if v is not None and constant_source(v) is not None:
                    stats.add(id(constant_source(v)))
    seen: set[int] = set()
    candidates: list[tuple[int, ir.DataType | None, tuple | None]] = []
    graphs = [info.graph] + list(dict.fromkeys(n.graph for n in nodes if n.graph is not info.graph))
    for value in (v for g in graphs for v in g.initializers.values()):
        tensor = value.const_value
        candidates.append((id(value), tensor.dtype if tensor is not None else value.dtype,
                           tuple(tensor.shape) if tensor is not None else None))
    for node in nodes:
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None:
                t = attr.as_tensor()
                candidates.append((id(node), t.dtype, tuple(t.shape)))
    for key, dtype, shape in candidates:
        if key in seen or key in stats or dtype not in FLOAT_TYPES or shape is None:
            continue
        seen.add(key)
        n = numel(shape)
        if n > 1:
            total += n
    return total


def out_in_axes(layer: Layer) -> tuple[int, int]:
    """(output axis, reduction/input axis) of the weight tensor in its ONNX layout."""
    rank = len(layer.weight_shape)
    if layer.op_type in RECURRENT_OPS:  # (directions, gates x hidden, inputs)
        return 1, 2
    if layer.op_type == "Conv":
        return 0, 1
    if layer.op_type == "ConvTranspose":
        return 1, 0
    if layer.op_type == "Gemm":
        trans = layer.node.attributes.get_int("transB" if layer.weight_input == 1 else "transA", 0)
        if layer.weight_input == 1:
            return (0, 1) if trans else (1, 0)
        return (1, 0) if trans else (0, 1)
    # MatMul: x @ W, W (..., K, N): inputs on axis -2; W @ x, W (..., M, K): inputs on axis -1 (MatMulNBits:
    # the (K, N) matrix it stands for)
    if layer.weight_input == 1:
        return rank - 1, rank - 2
    return rank - 2, rank - 1
