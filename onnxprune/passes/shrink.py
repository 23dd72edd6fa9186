"""Remove whole channels from the graph: shrink every tensor that holds the chosen channels.

Which channels go is decided before (onnxprune.planning.channel_selection); this pass rewrites the layer
weights (output and input axes; MatMulNBits' quantised ones through onnxprune.tensors.nbits), depthwise
group counts, BatchNorm parameters, per-channel constants, channel pads, attention head counts (Reshape
targets, GroupQueryAttention's KV groups with the cache's declared shapes) and flattening reshapes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.channels import ChannelGraph, Edit
from onnxprune.analysis.graph import constant_array, stored_value
from onnxprune.analysis.layers import out_in_axes
from onnxprune.tensors.nbits import is_nbits, nbits_weight, take
from onnxprune.tensors.weights import get_weight, lazy_from, new_initializer, write_nbits

__all__ = ["ShrinkChannelsPass", "shrink"]


def _take(arr: np.ndarray, cut: dict[int, list[int]]) -> np.ndarray:
    for axis, keep in cut.items():
        arr = np.take(arr, keep, axis=axis)
    return np.ascontiguousarray(arr)


class ShrinkChannelsPass(ir.passes.InPlacePass):
    """Rewrite the model without the channel classes ``remove`` of ``cg`` (the channel graph of this very
    model, analysed before the pass). Nodes that no longer feed anything stay for RemoveUnusedNodesPass."""

    def __init__(self, cg: ChannelGraph, remove: set[int]):
        super().__init__()
        self.cg, self.remove = cg, remove
        self.channels_after = {name: len(cg.kept(elems, remove)) for name, elems in cg.produced.items()}
        self.edits = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.edits = shrink(model, self.cg, self.remove)
        return ir.passes.PassResult(model, self.edits > 0)

    def ensures(self, model: ir.Model) -> None:
        """Every producing layer's weight has exactly the planned number of output channels."""
        for name, channels in self.channels_after.items():
            layer = self.cg.layers[name]
            weight = layer.node.inputs[layer.weight_input]
            shape = weight.const_value.shape if weight.const_value is not None else weight.shape
            found = None if shape is None else shape[out_in_axes(layer)[0]]
            if is_nbits(layer.node):
                found = layer.node.attributes.get_int("N")
            if found is not None and found != channels:
                raise ir.passes.PostconditionError(f"layer {name!r} has {found} output channels after the "
                                                   f"shrink, planned {channels}")


def shrink(model: ir.Model, cg: ChannelGraph, remove: set[int]) -> int:
    """Rewrite the graph without the channels of the ``remove`` classes. Returns the number of edits."""
    graph = model.graph
    weight_keep: dict[ir.Node, dict[int, list[int]]] = {}
    done = 0
    for edit in cg.edits:
        keep = cg.kept(edit.elems, remove)
        if edit.kind in ("weight_out", "weight_in"):
            weight_keep.setdefault(edit.node, {})[edit.axis] = keep
        elif len(keep) == len(edit.elems) and edit.kind != "pad":
            continue
        elif edit.kind == "param":
            _param(graph, edit, keep)
        elif edit.kind == "group":
            edit.node.attributes["group"] = ir.AttrInt64("group", len(keep))
        elif edit.kind == "pad":
            _pad(graph, cg, edit, remove)
        elif edit.kind == "heads":
            _heads(graph, edit, len(keep))
        elif edit.kind == "kv_groups":
            _kv_groups(edit, len(keep))
        elif edit.kind == "reshape":
            target = np.array(edit.extra["target"], copy=True)
            if target[edit.axis] > 0:
                target[edit.axis] = len(keep)
                edit.node.replace_input_with(1, new_initializer(graph, edit.node.inputs[1].name, target))
        done += 1
    layers_by_node = {layer.node: layer for layer in cg.layers.values()}
    for node, axes in weight_keep.items():
        layer = layers_by_node[node]
        if is_nbits(node):  # quantised: whole blocks of inputs keep their grid, partial ones are re-quantised
            weight = nbits_weight(node)
            outputs, inputs = axes.get(1), axes.get(0)
            if (outputs is None or len(outputs) == weight.q.shape[0]) and (inputs is None or len(inputs) == weight.k):
                continue
            write_nbits(node, take(weight, outputs, inputs))
            done += 1
            continue
        reader, index = _stored_reader(node, layer.weight_input)
        src = reader.inputs[index]
        w = np.asarray(get_weight(layer))
        cut = {axis: keep for axis, keep in axes.items() if len(keep) != w.shape[axis]}
        if not cut:
            continue
        if isinstance(src.const_value, ir.ExternalTensor):
            # memory-mapped (big models): the kept slices are taken while the model is written, a layer at a time
            shape = list(w.shape)
            for axis, keep in cut.items():
                shape[axis] = len(keep)
            new = lazy_from(src.const_value, lambda a, c=cut: _take(a, c), tuple(shape))
        else:
            new = _take(w, cut)
        reader.replace_input_with(index, new_initializer(graph, src.name, new))
        done += 1
    _forget_shapes(graph)
    return done


def _stored_reader(node: ir.Node, index: int) -> tuple[ir.Node, int]:
    """The node and input index that read a weight where it is stored: the layer itself, or the first of the
    Cast / Identity nodes that convert a weight kept in another type (bfloat16) for it."""
    value = node.inputs[index]
    while value is not stored_value(value):
        node, index = value.producer(), 0
        value = node.inputs[0]
    return node, index


def _param(graph: ir.Graph, edit: Edit, keep: list[int]) -> None:
    src = edit.node.inputs[edit.input_index]
    arr = constant_array(src)  # the graph's current value (a refit may have changed it) ...
    if arr is None:  # ... or the one the analysis folded from a small constant computation
        arr = edit.extra["value"]
    new = np.ascontiguousarray(np.take(arr, keep, axis=edit.axis))
    edit.node.replace_input_with(edit.input_index, new_initializer(graph, src.name, new))


def _heads(graph: ir.Graph, edit: Edit, heads: int) -> None:
    """Write the kept head count (split) or kept width (merge) into a Reshape target, and the head size as a
    constant (never computed from a tensor that shrinks)."""
    kind, source = edit.extra["spots"]
    d, a, mode = edit.extra["d"], edit.axis, edit.extra["mode"]
    values = {"split": {a: heads, a + 1: d}, "merge": {a: heads * d}, "keep": {a: heads}, "none": {}}[mode]
    node = edit.node
    if kind == "const":
        target = np.array(source, np.int64).reshape(-1)
        for k, v in values.items():
            target[k] = v
        node.replace_input_with(1, new_initializer(graph, node.inputs[1].name, target))
        return
    for k, v in values.items():
        src = source.inputs[k]
        source.replace_input_with(k, new_initializer(graph, src.name, np.array([v], np.int64)))


def _kv_groups(edit: Edit, groups: int) -> None:
    """A GroupQueryAttention with ``groups`` KV groups left: its head counts, and the head axis (1) of its
    past inputs and present outputs (graph inputs and outputs keep declared shapes)."""
    node = edit.node
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", groups * edit.extra["ratio"])
    node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", groups)
    for value in (*node.inputs[3:5], *node.outputs[1:3]):
        if value is not None and value.shape is not None and len(value.shape) == 4:
            dims = list(value.shape)
            dims[1] = groups
            value.shape = ir.Shape(dims)


def _pad(graph: ir.Graph, cg: ChannelGraph, edit: Edit, remove: set[int]) -> None:
    before = len(cg.kept(edit.extra["before"], remove))
    after = len(cg.kept(edit.extra["after"], remove))
    axes, pads = edit.extra["axes"], list(edit.extra["pads"])
    k = axes.index(edit.axis)
    if pads[k] == before and pads[len(axes) + k] == after:
        return
    pads[k], pads[len(axes) + k] = before, after
    src = edit.node.inputs[1]
    edit.node.replace_input_with(1, new_initializer(graph, src.name, np.array(pads, np.int64)))


def _forget_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes are stale after shrinking: drop them (shape inference recomputes them)."""
    keep = set(graph.inputs) | set(graph.outputs)
    for node in graph:
        for v in node.outputs:
            if v not in keep:
                v.shape = None
