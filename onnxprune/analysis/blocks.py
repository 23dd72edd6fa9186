"""Residual blocks: every Add (or two-input Sum) that joins a skip path and a branch holding prunable layers.

For an Add(a, b) the *fork* is the latest value both inputs derive from (walking back over run-time
floating-point edges only, so shape computations and constants never count). The block is the set of nodes
on the branch from the fork to the Add. The other input is the skip path:

- ``identity``: the skip input is the fork itself (x + f(x); pre-norm transformers x + f(LN(x)); post-norm
  transformers LN(x + f(x)));
- ``parameter-free``: nodes without weights between the fork and the Add (e.g. the option-A ResNet shortcut,
  Slice + Pad);
- ``projection``: the skip path has prunable layers of its own (1x1 conv downsample).

The two paths share no node (a rotary embedding's ``q * cos + rotate_half(q) * sin`` joins two paths through
the same projection: not a residual).

A block is removable when dropping its branch (the Add then passes the skip value on) keeps every shape
valid: the skip value has the Add's output shape, and no value inside the branch is used outside it, except
its KV cache: graph outputs computed from the branch (``present.N.key``) out of graph inputs that only the
branch reads (``past_key_values.N.key``). Those go with the block (``cache_inputs``, ``cache_outputs``).

Transformer layers (``transformer_layers``): an attention block and the blocks after it up to the next
attention block (its MLP), the unit a decoder LLM's layer count counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import FLOAT_TYPES, GraphInfo, const_shape, constant_source
from onnxprune.analysis.layers import Layer

__all__ = ["FUSED_RESIDUAL_OPS", "RESIDUAL_OPS", "Block", "branch_params", "find_blocks", "residual_inputs",
           "transformer_layers"]

RESIDUAL_OPS = ("Add", "Sum")
# ONNX Runtime's fused residual + normalisation (its transformer optimizer, GenAI's builder): output 0 is
# Norm(input + skip [+ bias]); inputs 0 and 1 are the two paths the block joins
FUSED_RESIDUAL_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def residual_inputs(node: ir.Node) -> list[ir.Value] | None:
    """The two values a residual join adds (an Add, a two-input Sum, or a fused Skip*Normalization of ONNX
    Runtime), or None when ``node`` is not one."""
    if node.op_type in RESIDUAL_OPS and node.domain in ("", "ai.onnx"):
        ins = [v for v in node.inputs if v is not None]
        return ins if len(ins) == 2 else None
    if node.op_type in FUSED_RESIDUAL_OPS and node.domain == "com.microsoft" and len(node.inputs) >= 2:
        ins = list(node.inputs[:2])
        return ins if all(v is not None for v in ins) else None
    return None


@dataclass
class Block:
    name: str  # the joining Add's node name
    skip: str  # identity | parameter-free | projection
    removable: bool
    layers: list[str]  # prunable layers of the branch, in graph order
    params: int  # every learnable parameter of the branch (layers, biases, norms)
    flops: int | None
    fork: str  # the value the branch and the skip path start from
    branch_input: int  # which input of the Add is the branch
    nodes: list[str] = field(default_factory=list)  # every node of the branch
    skip_layers: list[str] = field(default_factory=list)
    reason: str | None = None  # why it is not removable
    cache_inputs: list[str] = field(default_factory=list)  # graph inputs only the branch reads (its past KV cache)
    cache_outputs: list[str] = field(default_factory=list)  # graph outputs computed from them (its present cache)
    attention: bool = False  # the branch attends (an attention op, a Softmax, or a KV cache)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "params": self.params,
            "flops": self.flops,
            "skip": self.skip,
            "removable": self.removable,
            "layers": self.layers,
            "skip_layers": self.skip_layers,
            "fork": self.fork,
            "branch_input": self.branch_input,
            "nodes": self.nodes,
            "reason": self.reason,
            "cache_inputs": self.cache_inputs,
            "cache_outputs": self.cache_outputs,
            "attention": self.attention,
        }


class _Ancestry:
    """Backward reachability over run-time float edges, memoised per value."""

    def __init__(self, info: GraphInfo):
        self.info = info
        self._nodes: dict[str, frozenset[ir.Node]] = {}
        self._data: dict[ir.Value, bool] = {}

    def is_data_edge(self, value: ir.Value) -> bool:
        known = self._data.get(value)
        if known is None:
            known = self._data[value] = self.info.is_data_edge(value)
        return known

    def nodes(self, value: ir.Value) -> frozenset[ir.Node]:
        """Nodes whose outputs reach ``value`` over data edges (including its producer)."""
        cached = self._nodes.get(value.name)
        if cached is not None:
            return cached
        seen: set[ir.Node] = set()
        stack = [value]
        while stack:
            v = stack.pop()
            node = v.producer()
            if node is None or node in seen or not self.is_data_edge(v):
                continue
            seen.add(node)
            stack.extend(i for i in node.inputs if i is not None and self.is_data_edge(i))
        result = frozenset(seen)
        self._nodes[value.name] = result
        return result

    def values(self, value: ir.Value) -> set[ir.Value]:
        """Data values that reach ``value`` (including itself). A fused Skip*Normalization's normalised output
        is computed from its residual sum (output 3), which therefore reaches everything the output does."""
        vals = {value}
        for node in self.nodes(value):
            vals.update(i for i in node.inputs if i is not None and self.is_data_edge(i))
            total = _fused_sum(node)
            if total is not None:
                vals.add(total)
        return vals


def _fused_sum(node: ir.Node) -> ir.Value | None:
    """The residual-sum output (index 3) of a fused Skip*Normalization, when it has one."""
    if node.op_type in FUSED_RESIDUAL_OPS and len(node.outputs) > 3 and node.outputs[3].name:
        return node.outputs[3]
    return None


def _position(info: GraphInfo, value: ir.Value) -> int:
    node = value.producer()
    return -1 if node is None else info.order.get(node, -1)


def _path_nodes(anc: _Ancestry, fork: ir.Value, end: ir.Value) -> set[ir.Node]:
    """Nodes on paths from ``fork`` to ``end``: ancestors of ``end`` that descend from ``fork``."""
    if end is fork:
        return set()
    candidates = anc.nodes(end)
    path: set[ir.Node] = set()
    frontier = [fork]
    while frontier:
        v = frontier.pop()
        producer = v.producer()
        if producer is not None and _fused_sum(producer) is v:
            frontier.append(producer.outputs[0])  # the normalised sum: computed from v
        for use in v.uses():
            n = use.node
            if n in candidates and n not in path:
                path.add(n)
                frontier.extend(n.outputs)
    return path


def find_blocks(info: GraphInfo, layers: list[Layer]) -> list[Block]:
    anc = _Ancestry(info)
    by_node = {layer.node: layer for layer in layers}
    graph_outputs = set(info.graph.outputs)
    blocks: list[Block] = []
    for add in info.graph:
        ins = residual_inputs(add)
        if ins is None or not all(info.is_data_edge(v) for v in ins):
            continue
        common = anc.values(ins[0]) & anc.values(ins[1])
        if not common:
            continue
        fork = max(common, key=lambda v: _position(info, v))
        if not common <= anc.values(fork):
            continue  # two unrelated common ancestors: not a fork/join pattern
        paths = [_path_nodes(anc, fork, v) for v in ins]
        if paths[0] & paths[1]:
            continue  # the paths share nodes: two uses of one computation (a rotary embedding), not a residual
        path_layers = [[by_node[n] for n in sorted(p, key=info.order.get) if n in by_node] for p in paths]
        if not any(path_layers):
            continue
        # the branch is the path with more layers (then more parameters); the other one is the skip path
        branch_idx = max(
            (0, 1), key=lambda i: (len(path_layers[i]), sum(layer.params for layer in path_layers[i]), -i)
        )
        skip_idx = 1 - branch_idx
        if _broadcast(info.shape(ins[skip_idx]), info.shape(add.outputs[0])):
            continue  # an addend broadcast over the output (an attention mask, a bias): not a skip path
        branch_nodes, branch_layers = paths[branch_idx], path_layers[branch_idx]
        if ins[skip_idx] is fork:
            skip = "identity"
        elif path_layers[skip_idx]:
            skip = "projection"
        else:
            skip = "parameter-free"
        cache_in, cache_out = _cache(info, add, branch_nodes, graph_outputs)
        removable, reason = _removable(info, add, ins[skip_idx], branch_nodes, graph_outputs - set(cache_out))
        flops = [layer.flops for layer in branch_layers]
        blocks.append(
            Block(
                name=add.name,
                skip=skip,
                removable=removable,
                layers=[layer.name for layer in branch_layers],
                params=branch_params(branch_nodes) + _fused_bias(add),
                flops=None if any(f is None for f in flops) else sum(flops),
                fork=fork.name,
                branch_input=list(add.inputs).index(ins[branch_idx]),
                nodes=[n.name for n in sorted(branch_nodes, key=info.order.get)],
                skip_layers=[layer.name for layer in path_layers[skip_idx]],
                reason=reason,
                cache_inputs=[v.name for v in cache_in],
                cache_outputs=[v.name for v in cache_out],
                attention=bool(cache_in) or any(n.op_type in ATTENTION_OPS for n in branch_nodes),
            )
        )
    return blocks


ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "SparseAttention")


def _cache(info: GraphInfo, add: ir.Node, branch: set[ir.Node], graph_outputs: set[ir.Value]
           ) -> tuple[list[ir.Value], list[ir.Value]]:
    """The branch's KV cache: the graph outputs computed (past the branch, never through ``add``) from the
    branch and graph inputs only, and the graph inputs it reads (directly, or passed on unchanged by one-input
    nodes) that nothing else reads except for their shape."""
    outputs: list[ir.Value] = []
    own = set(branch)
    frontier = [v for n in branch for v in n.outputs]
    while frontier:
        v = frontier.pop()
        if v in graph_outputs and v not in outputs:
            outputs.append(v)
        for use in v.uses():
            n = use.node
            if n is add or n in own:
                continue
            if all(i is None or i.producer() in own or constant_source(i) is not None or _input_source(i)
                   for i in n.inputs):
                own.add(n)
                frontier.extend(n.outputs)
    sources = {_input_source(i) for n in own for i in n.inputs if i is not None} - {None}
    # a past input whose other readers only take its shape (a causal mask sized from layer 0's past) still
    # goes with the block: those readers are given another layer's past of the same shape (RemoveBlocksPass)
    cache_in = [v for v in sources if _goes_with(v, own)]
    if not outputs or not cache_in:
        return [], []
    order = {v: i for i, v in enumerate(info.graph.outputs)}
    inputs_order = {v: i for i, v in enumerate(info.graph.inputs)}
    return sorted(cache_in, key=inputs_order.get), sorted(outputs, key=order.get)


def _input_source(value: ir.Value) -> ir.Value | None:
    """The graph input ``value`` is, or that one-input nodes (an Identity, a one-input Concat) pass on to it."""
    while value is not None:
        if value.is_graph_input():
            return value
        node = value.producer()
        ins = [] if node is None else [i for i in node.inputs if i is not None]
        if len(ins) != 1:
            return None
        value = ins[0]
    return None


def _goes_with(value: ir.Value, own: set[ir.Node]) -> bool:
    """Whether every reader of ``value`` is one of ``own``, a Shape, or passes it on (a one-input node: an
    Identity, a one-input Concat) to such readers only."""
    for use in value.uses():
        node = use.node
        if node in own or node.op_type == "Shape":
            continue
        if sum(i is not None for i in node.inputs) != 1 or any(o.is_graph_output() for o in node.outputs):
            return False
        if not all(_goes_with(o, own) for o in node.outputs):
            return False
    return True


def transformer_layers(blocks: list[Block]) -> list[list[Block]]:
    """Consecutive blocks grouped into transformer layers: each attention block with the blocks after it up to
    the next attention block. Empty when no block attends."""
    layers: list[list[Block]] = []
    for block in blocks:
        if block.attention:
            layers.append([block])
        elif layers:
            layers[-1].append(block)
    return layers


def _fused_bias(join: ir.Node) -> int:
    """The branch's last bias, which a fused Skip*Normalization carries as its input 4."""
    if join.op_type not in FUSED_RESIDUAL_OPS or len(join.inputs) < 5 or join.inputs[4] is None:
        return 0
    shape = const_shape(join.inputs[4]) if constant_source(join.inputs[4]) is not None else None
    return int(np.prod(shape)) if shape else 0


def branch_params(nodes: set[ir.Node]) -> int:
    """Every learnable parameter the nodes consume (weights, biases, BatchNorm scale and shift, LayerNorm
    scale and bias...): floating-point constants with more than one element, each counted once; BatchNorm
    running statistics are not parameters."""
    seen: set[int] = set()
    total = 0
    for node in nodes:
        inputs = list(node.inputs)
        if node.op_type == "BatchNormalization":
            inputs = inputs[:3]
        for v in inputs:
            src = constant_source(v) if v is not None else None
            if src is None or id(src) in seen:
                continue
            tensor = src.const_value if isinstance(src, ir.Value) else src.attributes["value"].as_tensor()
            if tensor is None or tensor.dtype not in FLOAT_TYPES:
                continue
            seen.add(id(src))
            n = int(np.prod(tensor.shape))
            if n > 1:
                total += n
    return total


def _removable(
    info: GraphInfo, add: ir.Node, skip_value: ir.Value, branch: set[ir.Node], graph_outputs: set[ir.Value]
) -> tuple[bool, str | None]:
    """``graph_outputs``: those the branch must not compute (its KV cache left out: it goes with the block)."""
    leak = _leak(info, add, branch, graph_outputs)
    if leak is not None:
        return False, leak
    skip_shape = info.shape(skip_value)
    out_shape = info.shape(add.outputs[0])
    if skip_shape is None or out_shape is None:
        return False, "shapes unknown (shape inference could not tell whether the skip path alone fits)"
    if len(skip_shape) != len(out_shape) or not all(
        _same_dim(a, b) for a, b in zip(skip_shape, out_shape, strict=True)
    ):
        return False, f"skip path shape {list(skip_shape)} differs from the block output {list(out_shape)}"
    return True, None


def _broadcast(skip_shape, out_shape) -> bool:
    """Whether the skip value is broadcast to the output: fewer dimensions, or a 1 where the output has more."""
    if skip_shape is None or out_shape is None:
        return False
    if len(skip_shape) < len(out_shape):
        return True
    return any(a == 1 and b != 1 for a, b in zip(skip_shape, out_shape, strict=False))


def _same_dim(a, b) -> bool:
    """Equal sizes; or two symbolic sizes one of which ONNX shape inference made up (``unk__N``): it names the
    same dimension differently on two paths it lost track of (a skip broadcast against the branch would be a
    number, 1, not a symbol)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and (a.startswith("unk__") or b.startswith("unk__"))


def _leak(info: GraphInfo, add: ir.Node, branch: set[ir.Node], graph_outputs: set[ir.Value]) -> str | None:
    """Why removing the branch would break the graph: some value derived from it (e.g. through a Shape or
    IsNaN side computation) reaches a node outside the block other than through the joining Add. Side nodes
    whose results only flow back into the branch are fine: they die with it."""
    derived: set[ir.Node] = set()  # nodes outside the branch that consume something computed in it
    frontier = [v for n in branch for v in n.outputs]
    while frontier:
        v = frontier.pop()
        if v in graph_outputs:
            return f"branch value {v.name!r} is a graph output"
        for use in v.uses():
            n = use.node
            if n is add or n in branch or n in derived:
                continue
            derived.add(n)
            frontier.extend(n.outputs)
    dying = set(branch) | {add}
    for node in sorted(derived, key=lambda n: info.order.get(n, -1), reverse=True):
        users = [(out, use.node) for out in node.outputs for use in out.uses()]
        outside = [(out, user) for out, user in users if user not in dying]
        if outside or any(out in graph_outputs for out in node.outputs):
            out, user = outside[0] if outside else (node.outputs[0], None)
            where = f"by {user.name!r}" if user is not None else "as a graph output"
            return f"value {out.name!r} computed from the branch is also used {where} outside the block"
        dying.add(node)
    return None
