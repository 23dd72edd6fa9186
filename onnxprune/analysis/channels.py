"""Channel dependency analysis: which channels of which tensors must be removed together.

Every output channel of a prunable layer (a Conv filter, a Gemm/MatMul output feature) is an *element*.
Walking the graph in order, each run-time tensor gets its channel axis and, per position on that axis, the
element it carries. Ops that keep channels apart pass the list through (activations, BatchNorm, per-channel
constants, pooling, Transpose); a residual Add (or any elementwise op of two run-time tensors) ties the two
lists position by position (union-find: tied elements must be removed together); Concat on the channel axis
joins the lists; a channel Pad adds elements of its own (its zero channels, removable with the channels they
are tied to); Flatten / Reshape before a Gemm repeats each channel over its spatial positions; a depthwise
Conv maps each channel to itself. Layers that consume a tracked tensor record which element each of their
input channels is. A *class* is a set of tied elements; removing it removes every one of its channels from
every tensor, layer weight, BatchNorm and constant that holds it, and the graph stays valid and computes the
same as the original with those channels zeroed at their producers (for paths that map 0 to 0).

Anything the analysis does not understand (an op it does not know on a channel axis, a graph output, a
grouped Conv, a Slice across channels, a shared weight) *blocks* the classes that reach it: they are never
removed, and the reason names the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import GraphInfo, constant_array
from onnxprune.analysis.layers import CHANNEL_OPS, Layer, out_in_axes

logger = logging.getLogger(__name__)

__all__ = ["BINARY", "POOLS", "UNARY", "ChannelGraph", "Edit", "Track", "channel_graph"]

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Clip", "Gelu", "Erf", "Mish", "Identity", "Dropout", "Cast", "Abs", "Neg", "Sqrt", "Exp", "Log",
    "Floor", "Ceil", "Round", "Sin", "Cos", "Reciprocal", "ThresholdedRelu", "Shrink", "Swish", "IsNaN", "IsInf",
    "Not", "Sign", "QuickGelu",
}
# ONNX Runtime's fused bias + activation (its transformer optimizer): input 1 is a per-channel bias
FUSED_BIAS_ACTIVATIONS = {"BiasGelu", "FastGelu"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where", "Equal", "Greater", "Less",
          "GreaterOrEqual", "LessOrEqual", "And", "Or"}


@dataclass
class Track:
    axis: int  # non-negative channel axis of the tensor
    elems: list[int]  # element id per position on that axis


@dataclass
class Edit:
    """Where an element list sits in a constant to rewrite: a layer weight axis, a node's constant input."""

    kind: str  # weight_out | weight_in | param | pad | group | reshape | heads | kv_groups
    node: ir.Node
    elems: list[int]
    axis: int = 0
    input_index: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class ChannelGraph:
    layers: dict[str, Layer]
    owners: list[tuple[str, str, int]]  # element -> (kind "layer"|"pad", node name, index)
    parent: list[int]
    blocked: dict[int, str]  # root -> reason
    edits: list[Edit]
    produced: dict[str, list[int]]  # layer name -> its output elements
    # classes() and groups(), computed once: the classes do not change once the graph is built, the groups
    # only when keep_coupled() blocks some (it clears them). Planning asks for both dozens of times.
    _classes: dict[int, list[int]] | None = field(default=None, init=False, repr=False, compare=False)
    _groups: list[dict] | None = field(default=None, init=False, repr=False, compare=False)
    _roots: list[int] | None = field(default=None, init=False, repr=False, compare=False)  # element -> class root

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def classes(self) -> dict[int, list[int]]:
        """Class root -> its elements (do not modify: it is shared)."""
        if self._classes is None:
            out: dict[int, list[int]] = {}
            for e in range(len(self.parent)):
                out.setdefault(self.find(e), []).append(e)
            self._classes = out
        return self._classes

    def kept(self, elems: list[int], remove: set[int]) -> list[int]:
        """Indices into ``elems`` of the elements whose class is not in ``remove``."""
        if self._roots is None:
            self._roots = [self.find(e) for e in range(len(self.parent))]
        roots = self._roots
        return [i for i, e in enumerate(elems) if roots[e] not in remove]

    def reason(self, root: int) -> str | None:
        return self.blocked.get(self.find(root))

    def groups(self) -> list[dict]:
        """Classes with the same producing layers, aggregated: what is coupled, and whether it can shrink
        (do not modify: it is shared)."""
        if self._groups is None:
            self._groups = self._aggregate()
        return self._groups

    def _aggregate(self) -> list[dict]:
        by_sig: dict[tuple, dict] = {}
        for root, members in self.classes().items():
            layers = tuple(sorted({self.owners[e][1] for e in members if self.owners[e][0] == "layer"}))
            if not layers:
                continue
            reason = self.blocked.get(root)
            key = (layers, reason is None)
            g = by_sig.setdefault(key, {"layers": list(layers), "channels": 0, "prunable": reason is None,
                                        "reason": reason, "roots": []})
            g["channels"] += 1
            g["roots"].append(root)
        return sorted(by_sig.values(), key=lambda g: (g["layers"][0], not g["prunable"]))

    def keep_coupled(self) -> None:
        """Block every group written by several layers (residual streams): only single-producer channels go."""
        for g in self.groups():
            if len(g["layers"]) > 1 and g["prunable"]:
                for root in g["roots"]:
                    self.blocked[self.find(root)] = "kept whole (--coupled keep): written by several layers"
        self._groups = None

    def describe(self) -> list[dict]:
        """The groups for users: coupled layers, channel count, prunable or why not, and every constant
        tensor that shrinks with the group as (tensor, axis, indices)."""
        groups = self.groups()
        group_of = {root: gi for gi, g in enumerate(groups) for root in g["roots"]}
        weight_of = {lay.node: lay.weight for lay in self.layers.values()}
        members: list[list[dict]] = [[] for _ in groups]
        for edit in self.edits:
            if edit.kind == "group":
                continue
            indices: dict[int, list[int]] = {}
            for i, e in enumerate(edit.elems):
                gi = group_of.get(self.find(e))
                if gi is not None:
                    indices.setdefault(gi, []).append(i)
            if not indices:
                continue
            if edit.kind in ("weight_out", "weight_in"):
                tensor = weight_of[edit.node]
            elif edit.kind == "param":
                tensor = edit.node.inputs[edit.input_index].name
            else:
                tensor = f"{edit.node.name} ({edit.kind})"
            for gi, idx in indices.items():
                members[gi].append({"tensor": tensor, "axis": edit.axis, "indices": idx})
        return [{"layers": g["layers"], "channels": g["channels"], "prunable": g["prunable"],
                 "reason": g["reason"], "members": m} for g, m in zip(groups, members, strict=True)]


class _Builder:
    def __init__(self, info: GraphInfo, layers: list[Layer]):
        self.info = info
        self.layers = {layer.node: layer for layer in layers  # the main graph's: bodies keep their channels
                       if layer.node is not None and layer.op_type in CHANNEL_OPS and layer.scope is None}
        self.cg = ChannelGraph({layer.name: layer for layer in layers}, [], [], {}, [], {})
        self.tracks: dict[ir.Value, Track] = {}

    # union-find ---------------------------------------------------------------------------------------
    def new(self, kind: str, name: str, n: int) -> list[int]:
        start = len(self.cg.parent)
        for i in range(n):
            self.cg.parent.append(start + i)
            self.cg.owners.append((kind, name, i))
        return list(range(start, start + n))

    def union(self, a: int, b: int) -> None:
        ra, rb = self.cg.find(a), self.cg.find(b)
        if ra == rb:
            return
        reason = self.cg.blocked.pop(ra, None) or self.cg.blocked.pop(rb, None)
        self.cg.parent[ra] = rb
        if reason:
            self.cg.blocked[rb] = reason

    def block(self, elems, reason: str) -> None:
        for e in elems:
            r = self.cg.find(e)
            self.cg.blocked.setdefault(r, reason)

    def block_inputs(self, node: ir.Node, why: str) -> None:
        for v in node.inputs:
            t = self.tracks.get(v) if v is not None else None
            if t is not None:
                self.block(t.elems, f"{node.op_type} node {node.name!r}: {why}")

    # helpers ------------------------------------------------------------------------------------------
    def rank(self, v: ir.Value) -> int | None:
        s = self.info.shape(v)
        return None if s is None else len(s)

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        """A constant input's value: an initializer, a Constant node, or a small computation of constants
        (folded by the analysis; the rewrite then writes a new initializer in its place)."""
        if v is None:
            return None
        if v.name in self.info.folded:
            return self.info.folded[v.name]
        if v.const_value is None and (v.producer() is None or v.producer().op_type != "Constant"):
            return None
        return constant_array(v)

    # the walk -----------------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        graph = self.info.graph
        for node in graph:
            try:
                self.visit(node)
            except (ValueError, IndexError, TypeError) as exc:  # an unexpected form: block, never corrupt
                logger.debug("channel analysis of %s %r: %s", node.op_type, node.name, exc)
                self.block_inputs(node, "not understood (a shape or constant it needs is unknown or unexpected)")
        for v in graph.outputs:
            t = self.tracks.get(v)
            if t is not None:
                self.block(t.elems, f"graph output {v.name!r} keeps its shape")
        return self.cg

    def visit(self, node: ir.Node) -> None:
        op = node.op_type
        ins = [self.tracks.get(v) if v is not None else None for v in node.inputs]
        if node in self.layers:
            self.layer(node, self.layers[node], ins)
            return
        if not any(t is not None for t in ins):
            return
        out = node.outputs[0] if node.outputs else None
        if op in UNARY:
            if ins[0] is not None and len(node.outputs) == 1:
                self.tracks[out] = ins[0]
            return
        if op == "BatchNormalization":
            t = ins[0]
            for i in range(1, 5):
                self.param(node, i, t, 0)
            self.tracks[out] = t
            return
        if op in BINARY or (op in FUSED_BIAS_ACTIVATIONS and node.domain == "com.microsoft"):
            self.binary(node, ins)
            return
        if op in POOLS or op in ("Resize", "Upsample"):
            self.tracks[out] = ins[0]
            return
        if op == "Concat":
            self.concat(node, ins)
            return
        if op == "Pad":
            self.pad(node, ins)
            return
        if op == "Slice":
            self.slice(node, ins)
            return
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None:
                perm = list(reversed(range(self.rank(node.inputs[0]) or 0)))
            self.tracks[out] = Track(list(perm).index(ins[0].axis), ins[0].elems)
            return
        if op == "Reshape" and self.heads(node, ins):
            return
        if op == "Shape":
            self.shape_of(node, ins[0])
            return
        if op in ("Flatten", "Reshape"):
            self.flatten(node, ins)
            return
        if op == "MatMul":  # two run-time tensors (a constant weight makes a layer): attention products
            self.matmul(node, ins)
            return
        if op in ("Softmax", "LogSoftmax"):
            axis = node.attributes.get_int("axis", -1) % (self.rank(out) or 1)
            if axis == ins[0].axis:
                self.block_inputs(node, "normalises across channels")
            else:
                self.tracks[out] = ins[0]
            return
        if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
            self.reduce(node, ins)
            return
        if op == "GroupQueryAttention" and node.domain == "com.microsoft":
            self.grouped_query_attention(node, ins)
            return
        self.block_inputs(node, "op not supported on a channel axis")

    def layer(self, node: ir.Node, layer: Layer, ins: list[Track | None]) -> None:
        out = node.outputs[0]
        w_out, w_in = out_in_axes(layer)
        shape = layer.weight_shape
        data = ins[1 - layer.weight_input] if layer.op_type in ("Gemm", "MatMul") else ins[0]
        if layer.shared_with or any(
                use.node is not node for use in node.inputs[layer.weight_input].uses()):
            if data is not None:
                self.block(data.elems, f"layer {layer.name!r} shares its weight")
            self.tracks[out] = Track(self.out_axis(layer), self.new("layer", layer.name, shape[w_out]))
            self.block(self.tracks[out].elems, f"layer {layer.name!r} shares its weight")
            return
        if layer.op_type in ("Conv", "ConvTranspose"):
            group = node.attributes.get_int("group", 1)
            if group > 1:
                cin = shape[1] * group if layer.op_type == "Conv" else shape[0]
                cout = shape[0] if layer.op_type == "Conv" else shape[1] * group
                if layer.op_type == "Conv" and group == cin == cout and data is not None and data.axis == 1:
                    self.cg.edits.append(Edit("weight_out", node, data.elems, axis=0))
                    self.cg.edits.append(Edit("group", node, data.elems))
                    self.param(node, 2, data, 0)
                    self.tracks[out] = data
                    return
                if data is not None:
                    self.block(data.elems, f"grouped Conv {layer.name!r} (group {group}) keeps its channels")
                elems = self.new("layer", layer.name, cout)
                self.block(elems, f"grouped Conv {layer.name!r} (group {group}) keeps its channels")
                self.tracks[out] = Track(1, elems)
                return
            if data is not None:
                if data.axis != 1 or len(data.elems) != shape[w_in]:
                    self.block(data.elems, f"layer {layer.name!r} reads channels on another axis")
                else:
                    self.cg.edits.append(Edit("weight_in", node, data.elems, axis=w_in))
            elems = self.new("layer", layer.name, shape[w_out])
            self.cg.edits.append(Edit("weight_out", node, elems, axis=w_out))
            self.cg.produced[layer.name] = elems
            t = Track(1, elems)
            self.param(node, 2, t, 0)
            self.tracks[out] = t
            return
        # Gemm / MatMul with a 2-D constant weight
        rank = self.rank(node.inputs[1 - layer.weight_input])
        trans_data = layer.op_type == "Gemm" and node.attributes.get_int(
            "transA" if layer.weight_input == 1 else "transB", 0)
        if len(shape) != 2 or layer.weight_input != 1 or trans_data or rank is None:
            if data is not None:
                self.block(data.elems, f"layer {layer.name!r} has a form the analysis does not shrink")
            elems = self.new("layer", layer.name, shape[w_out])
            self.block(elems, f"layer {layer.name!r} has a form the analysis does not shrink")
            self.tracks[out] = Track(max(rank or 2, 2) - 1, elems)
            return
        if data is not None:
            if data.axis != rank - 1 or len(data.elems) != shape[w_in]:
                self.block(data.elems, f"layer {layer.name!r} reads features on another axis")
            else:
                self.cg.edits.append(Edit("weight_in", node, data.elems, axis=w_in))
        elems = self.new("layer", layer.name, shape[w_out])
        self.cg.edits.append(Edit("weight_out", node, elems, axis=w_out))
        self.cg.produced[layer.name] = elems
        t = Track(rank - 1, elems)
        if layer.op_type == "Gemm":
            self.param(node, 2, t, None)
        self.tracks[out] = t

    @staticmethod
    def out_axis(layer: Layer) -> int:
        return 1

    def param(self, node: ir.Node, index: int, t: Track, axis: int | None) -> None:
        """A constant input that holds one value per channel (or broadcasts over them)."""
        if index >= len(node.inputs) or node.inputs[index] is None:
            return
        arr = self.const(node.inputs[index])
        if arr is None:
            self.block(t.elems, f"{node.op_type} node {node.name!r}: per-channel input {index} is not a constant")
            return
        if arr.ndim == 0:
            return
        if axis is None:  # Gemm bias C broadcasting against (N, features): its last axis
            axis = arr.ndim - 1
        if arr.shape[axis] == 1:
            return
        if arr.shape[axis] != len(t.elems):
            self.block(t.elems, f"{node.op_type} node {node.name!r}: input {index} does not match the channels")
            return
        self.cg.edits.append(Edit("param", node, t.elems, axis=axis, input_index=index, extra={"value": arr}))

    def binary(self, node: ir.Node, ins: list[Track | None]) -> None:
        out = node.outputs[0]
        out_rank = self.rank(out)
        tracked = [t for t in ins if t is not None]
        first = tracked[0]
        for t in tracked[1:]:
            if t.axis != first.axis or len(t.elems) != len(first.elems):
                self.block(first.elems + t.elems,
                           f"{node.op_type} node {node.name!r}: inputs carry channels differently")
                return
            for a, b in zip(first.elems, t.elems, strict=True):
                self.union(a, b)
        for i, v in enumerate(node.inputs):
            if ins[i] is not None or v is None:
                continue
            arr = self.const(v)
            shape = arr.shape if arr is not None else self.info.shape(v)
            if shape is None or out_rank is None:
                self.block(first.elems, f"{node.op_type} node {node.name!r}: an input of unknown shape")
                return
            ax = first.axis - (out_rank - len(shape))
            if ax < 0 or shape[ax] == 1:
                continue
            if arr is None:
                self.block(first.elems, f"{node.op_type} node {node.name!r}: combined with a tensor whose channels "
                                        "cannot shrink")
                return
            self.param(node, i, first, ax)
        self.tracks[out] = first

    def concat(self, node: ir.Node, ins: list[Track | None]) -> None:
        out = node.outputs[0]
        rank = self.rank(out)
        if rank is None:
            self.block_inputs(node, "joins tensors whose rank shape inference could not tell")
            return
        axis = node.attributes.get_int("axis", 0) % rank
        parts = []
        for v, t in zip(node.inputs, ins, strict=True):
            if t is not None and t.axis == axis:
                parts += t.elems
                continue
            s = self.info.shape(v)
            if t is not None or s is None or not isinstance(s[axis], int):
                self.block_inputs(node, "concatenates channels it cannot follow")
                return
            fixed = self.new("pad", node.name, s[axis])
            self.block(fixed, f"Concat node {node.name!r}: input {v.name!r} keeps its channels")
            parts += fixed
        self.tracks[out] = Track(axis, parts)

    def pad(self, node: ir.Node, ins: list[Track | None]) -> None:
        t = ins[0]
        out = node.outputs[0]
        mode = node.attributes.get_string("mode", "constant")
        pads = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = self.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        rank = self.rank(node.inputs[0])
        if pads is None or rank is None:
            self.block_inputs(node, "pads that are not constant")
            return
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        pads = [int(p) for p in pads.reshape(-1)]
        k = len(axes)
        before = dict(zip(axes, pads[:k], strict=True))
        after = dict(zip(axes, pads[k:], strict=True))
        b, a = before.get(t.axis, 0), after.get(t.axis, 0)
        if b == 0 and a == 0:
            self.tracks[out] = t
            return
        if mode != "constant" or b < 0 or a < 0:
            self.block_inputs(node, "pads channels in a way the analysis does not follow")
            return
        eb, ea = self.new("pad", node.name, b), self.new("pad", node.name, a)
        self.cg.edits.append(Edit("pad", node, t.elems, axis=t.axis, extra={"before": eb, "after": ea,
                                                                          "axes": axes, "pads": pads}))
        self.tracks[out] = Track(t.axis, eb + t.elems + ea)

    def slice(self, node: ir.Node, ins: list[Track | None]) -> None:
        t = ins[0]
        rank = self.rank(node.inputs[0])
        axes = self.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        starts = self.const(node.inputs[1])
        if rank is None or starts is None:
            self.block_inputs(node, "slices with bounds that are not constant")
            return
        axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
        if t.axis in axes:
            self.block_inputs(node, "slices across channels")
            return
        self.tracks[node.outputs[0]] = t

    def flatten(self, node: ir.Node, ins: list[Track | None]) -> None:
        t = ins[0]
        shape = self.info.shape(node.inputs[0])
        out = node.outputs[0]
        out_shape = self.info.shape(out)
        if t is None or shape is None or out_shape is None:
            self.block_inputs(node, "reshapes channels it cannot follow")
            return
        if node.op_type == "Flatten":
            axis = node.attributes.get_int("axis", 1) % max(len(shape), 1)
        else:
            axis = len(out_shape) - 1 if len(out_shape) == 2 else -1
            if axis != 1 or any(not isinstance(d, int) for d in shape[1:]) or shape[0] != out_shape[0] and \
                    isinstance(out_shape[0], int) and isinstance(shape[0], int):
                self.block_inputs(node, "reshapes channels it cannot follow")
                return
        if axis > t.axis or any(not isinstance(d, int) for d in shape[t.axis:]):
            self.block_inputs(node, "merges channels with other axes it cannot follow")
            return
        if axis != t.axis and any(shape[i] != 1 for i in range(axis, t.axis)):
            self.block_inputs(node, "merges channels with other axes it cannot follow")
            return
        inner = int(np.prod(shape[t.axis + 1:], dtype=np.int64))
        elems = [e for e in t.elems for _ in range(inner)]
        if node.op_type == "Reshape":
            target = self.const(node.inputs[1])
            if target is None:
                self.block_inputs(node, "reshapes to a shape that is not constant")
                return
            self.cg.edits.append(Edit("reshape", node, elems, axis=1, extra={"target": target}))
        self.tracks[out] = Track(axis, elems)

    # attention heads -----------------------------------------------------------------------------------
    def heads(self, node: ir.Node, ins: list[Track | None]) -> bool:
        """A Reshape that splits a channel axis into (heads, head size), or merges (heads, head size) back.

        Split: the channels of each head are tied (only whole heads go), and the new tensor carries one
        element per head on the head axis. Merge: each head's element is repeated over its head size. The
        reshape target (a constant, or a Concat of one-element pieces as exporters write ``view(b, t, h, d)``)
        gets the kept head count (split) or the kept width (merge) written in when heads are removed; the
        head size is written as a constant too, so that it never depends on a tensor that shrinks. Returns
        False when the Reshape is not of that form (the caller then tries the flattening rules)."""
        t = ins[0]
        shape, out_shape = self.info.shape(node.inputs[0]), self.info.shape(node.outputs[0])
        if t is None or shape is None or out_shape is None or ins[1] is not None:
            return False
        a, c = t.axis, len(t.elems)
        if len(out_shape) == len(shape) + 1 and a == len(shape) - 1:  # (.., C) -> (.., H, D)
            h, d = out_shape[a], out_shape[a + 1]
            if isinstance(h, int) and h > 1 and c % h == 0:
                d = c // h
            elif isinstance(d, int) and d > 0 and c % d == 0 and d < c:
                h = c // d
            else:
                return False
            if not self._same_lead(shape[:a], out_shape[:a]):
                return False
            spots = self._rewritable_target(node, t, len(out_shape), "splits channels into heads")
            if spots is None:
                return True
            reps = []
            for k in range(h):
                head = t.elems[k * d:(k + 1) * d]
                for e in head[1:]:
                    self.union(head[0], e)
                reps.append(head[0])
            self.cg.edits.append(Edit("heads", node, reps, axis=a, extra={"spots": spots, "mode": "split", "d": d}))
            self.tracks[node.outputs[0]] = Track(a, reps)
            return True
        if len(out_shape) == len(shape) and a < len(shape) - 1:  # heads stay where they are: (B, H, T, D) again
            spots = self._target_spots(node.inputs[1], len(out_shape))
            if spots is None or self._spot_value(spots, a) not in (-1, c):
                return False
            self.cg.edits.append(Edit("heads", node, t.elems, axis=a,
                                      extra={"spots": spots, "mode": "keep" if self._spot_value(spots, a) == c
                                             else "none", "d": 1}))
            self.tracks[node.outputs[0]] = t
            return True
        if len(out_shape) == len(shape) - 1 and a == len(shape) - 2:  # (.., H, D) -> (.., H * D)
            width, d = out_shape[a], shape[a + 1]
            if not isinstance(d, int):
                if not isinstance(width, int) or width % c:
                    return False
                d = width // c
            if not self._same_lead(shape[:a], out_shape[:a]):
                return False
            spots = self._rewritable_target(node, t, len(out_shape), "merges heads")
            if spots is None:
                return True
            self.cg.edits.append(Edit("heads", node, t.elems, axis=a, extra={"spots": spots, "mode": "merge", "d": d}))
            self.tracks[node.outputs[0]] = Track(a, [e for e in t.elems for _ in range(d)])
            return True
        return False

    def grouped_query_attention(self, node: ir.Node, ins: list[Track | None]) -> None:
        """ONNX Runtime's GroupQueryAttention on packed query-key-value channels [q heads | k heads | v heads]
        (GenAI's builder): the unit is a KV group, one key head, one value head and the query heads sharing
        them, tied into one class; the output carries the query heads' channels. Removing groups rewrites
        ``num_heads`` / ``kv_num_heads`` and the KV cache's head axis (its past inputs, present outputs)."""
        t = ins[0]
        heads, kv = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
        packed = all(v is None for v in node.inputs[1:3])
        if (t is None or not packed or not heads or not kv or heads % kv or any(x is not None for x in ins[1:])
                or t.axis != (self.rank(node.inputs[0]) or 0) - 1 or len(t.elems) % (heads + 2 * kv)):
            self.block_inputs(node, "attention not in the packed query-key-value form split into KV groups")
            return
        d, ratio, e = len(t.elems) // (heads + 2 * kv), heads // kv, t.elems
        reps = []
        for g in range(kv):
            members = (e[g * ratio * d:(g + 1) * ratio * d] + e[(heads + g) * d:(heads + g + 1) * d]
                       + e[(heads + kv + g) * d:(heads + kv + g + 1) * d])
            for m in members[1:]:
                self.union(members[0], m)
            reps.append(members[0])
        self.cg.edits.append(Edit("kv_groups", node, reps, extra={"ratio": ratio}))
        self.tracks[node.outputs[0]] = Track(t.axis, e[:heads * d])

    def _rewritable_target(self, node: ir.Node, t: Track, rank: int, what: str) -> list | None:
        """The Reshape's target spots, or None after blocking the channels when the target cannot be rewritten."""
        spots = self._target_spots(node.inputs[1], rank)
        if spots is None:
            self.block(t.elems, f"Reshape node {node.name!r}: {what} with a target shape it cannot rewrite")
        return spots

    @staticmethod
    def _same_lead(a: tuple, b: tuple) -> bool:
        return all(x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(a, b, strict=True))

    def _target_spots(self, target: ir.Value, rank: int) -> list | None:
        """Where each entry of a Reshape target comes from, to rewrite entries: ("const", value) for a constant
        target, or ("concat", node) when it is a Concat of ``rank`` one-element pieces; None otherwise."""
        arr = self.const(target)
        if arr is not None:
            return ["const", arr] if arr.size == rank else None
        node = target.producer()
        if node is None or node.op_type != "Concat" or len(node.inputs) != rank:
            return None
        for v in node.inputs:
            arr = self.const(v)
            if (arr.size if arr is not None else self.info.shape(v)) not in (1, (1,), ()):
                return None
        return ["concat", node]

    def _spot_value(self, spots: list, k: int) -> int | None:
        """Entry k of a Reshape target found by _target_spots, when it is a constant."""
        kind, source = spots
        if kind == "const":
            return int(np.asarray(source).reshape(-1)[k])
        arr = self.const(source.inputs[k])
        return None if arr is None else int(arr.reshape(-1)[0])

    def shape_of(self, node: ir.Node, t: Track | None) -> None:
        """Shape of a tensor that carries channels: harmless when only entries off the channel axis are read
        (exporters take batch and sequence length this way); otherwise the shape would change under them."""
        rank = self.rank(node.inputs[0])
        if t is None:
            return
        if rank is None or "start" in node.attributes or "end" in node.attributes:
            self.block_inputs(node, "reads a shape that changes when channels go")
            return
        for use in node.outputs[0].uses():
            reader = use.node
            index = self.const(reader.inputs[1]) if reader.op_type == "Gather" and len(reader.inputs) > 1 else None
            if index is None or index.size != 1 or int(index.reshape(-1)[0]) % rank == t.axis:
                self.block_inputs(node, "reads a shape that changes when channels go")
                return

    def matmul(self, node: ir.Node, ins: list[Track | None]) -> None:
        """A product of two run-time tensors (attention scores, weighted values): channels on a shared
        leading (batch) axis, like attention heads, pass through and tie the two inputs; channels on the
        multiplied axes block."""
        ranks = [self.rank(v) for v in node.inputs]
        out_rank = self.rank(node.outputs[0])
        if None in ranks or out_rank is None:
            self.block_inputs(node, "multiplies tensors of unknown rank")
            return
        axes = set()
        for t, r in zip(ins, ranks, strict=True):
            if t is None:
                continue
            if t.axis >= r - 2:
                self.block_inputs(node, "multiplies along channels it cannot follow")
                return
            axes.add(t.axis + out_rank - r)
        if len(axes) != 1:
            self.block_inputs(node, "inputs carry channels on different axes")
            return
        axis = axes.pop()
        tracked = [t for t in ins if t is not None]
        for t in tracked[1:]:
            if len(t.elems) != len(tracked[0].elems):
                self.block_inputs(node, "inputs carry different channel counts")
                return
            for x, y in zip(tracked[0].elems, t.elems, strict=True):
                self.union(x, y)
        for v, t, r in zip(node.inputs, ins, ranks, strict=True):
            if t is None:
                s = self.info.shape(v)
                k = axis - (out_rank - r)
                if k >= 0 and (s is None or s[k] != 1):
                    self.block_inputs(node, "multiplies channels with a tensor whose channels cannot shrink")
                    return
        self.tracks[node.outputs[0]] = Track(axis, tracked[0].elems)

    def reduce(self, node: ir.Node, ins: list[Track | None]) -> None:
        t = ins[0]
        rank = self.rank(node.inputs[0])
        axes = node.attributes.get_ints("axes", None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = self.const(node.inputs[1])
            axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
        if rank is None or axes is None:
            self.block_inputs(node, "reduces over axes it cannot tell")
            return
        axes = [a % rank for a in axes]
        if t.axis in axes:
            self.block_inputs(node, "reduces across channels")
            return
        keep = node.attributes.get_int("keepdims", 1)
        axis = t.axis if keep else t.axis - sum(a < t.axis for a in axes)
        self.tracks[node.outputs[0]] = Track(axis, t.elems)


def channel_graph(info: GraphInfo, layers: list[Layer]) -> ChannelGraph:
    """The channel dependency analysis of a graph (see the module docstring)."""
    return _Builder(info, layers).run()
