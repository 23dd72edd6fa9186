"""Remove whole channels: choose them per coupled group, then shrink every tensor that holds them.

The channel dependency analysis (onnxprune.analysis.channels) says which channels are tied together; this
pass picks, in each prunable group, the channels to remove (the lowest by the L1 or L2 norm of their
filters, summed over the group's layers after dividing by each layer's mean norm, as every layer of a group
loses the same channels), and rewrites the layer weights (output and input axes), depthwise group counts,
BatchNorm parameters, per-channel constants, channel pads and flattening reshapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.channels import ChannelGraph, Edit
from onnxprune.analysis.graph import constant_array
from onnxprune.weights import get_weight, lazy_from, out_in_axes, release_weight

CRITERIA = ("l1", "l2")


@dataclass
class GroupChoice:
    layers: list[str]
    channels: int
    removed: int
    ratio: float  # the planned fraction for the group (before rounding)


def filter_norms(layer, criterion: str) -> np.ndarray:
    w = np.asarray(get_weight(layer), np.float64)
    axis = out_in_axes(layer)[0]
    m = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return np.abs(m).sum(1) if criterion == "l1" else np.sqrt((m ** 2).sum(1))


def _normalised_norms(cg: ChannelGraph, criterion: str) -> dict[str, np.ndarray]:
    """Each producing layer's filter norms over their mean, computed once per channel graph and criterion
    (allocation calls choose() dozens of times; on a big model each computation reads every weight)."""
    cache = cg.norm_cache
    if criterion not in cache:
        norms = {}
        for name in cg.produced:
            n = filter_norms(cg.layers[name], criterion)
            norms[name] = n / (float(n.mean()) or 1.0)
            release_weight(cg.layers[name])
        cache[criterion] = norms
    return cache[criterion]


def choose(cg: ChannelGraph, ratios: dict[str, float], criterion: str = "l2", round_to: int = 1,
           counts: dict[tuple, int] | None = None) -> tuple[set[int], list[GroupChoice]]:
    """The class roots to remove and what was chosen per group. ``ratios``: layer name -> fraction of its
    output channels to remove (from a plan's per-layer sparsities). A group takes the mean of its layers'
    ratios weighted by their parameters; its kept channel count is rounded to a multiple of ``round_to``
    (never below it, never above the group's size). ``counts`` (group layers -> channels to remove), where it
    names a group, overrides the ratios (a plan's rounded counts)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    norms = _normalised_norms(cg, criterion)
    remove: set[int] = set()
    choices = []
    members = cg.classes()
    for g in cg.groups():
        if not g["prunable"]:
            continue
        ratio = group_ratio(cg, g, ratios)
        n = g["channels"]
        kept = n - int(np.floor(ratio * n + 1e-9))
        if counts is not None and tuple(g["layers"]) in counts:
            kept = n - counts[tuple(g["layers"])]
        elif round_to > 1:
            step = group_step(cg, g, round_to, members)
            kept = int(round(kept / step)) * step
            kept = max(kept, step)
        kept = min(max(kept, 1), n)
        if kept == n:
            choices.append(GroupChoice(g["layers"], n, 0, ratio))
            continue
        score = {}
        for root in g["roots"]:
            total = 0.0
            for e in members[root]:
                kind, name, idx = cg.owners[e]
                if kind == "layer" and name in norms:
                    total += norms[name][idx]
            score[root] = total
        ordered = sorted(g["roots"], key=lambda r: (score[r], r))
        remove.update(ordered[: n - kept])
        choices.append(GroupChoice(g["layers"], n, n - kept, ratio))
    return remove, choices


def group_ratio(cg: ChannelGraph, group: dict, ratios: dict[str, float]) -> float:
    """A group's fraction of channels to remove: its layers' planned fractions, weighted by their parameters."""
    weights = np.array([cg.layers[n].params for n in group["layers"]], np.float64)
    rs = np.array([ratios.get(n, 0.0) for n in group["layers"]], np.float64)
    return float((weights * rs).sum() / weights.sum()) if weights.sum() else float(rs.mean())


def group_step(cg: ChannelGraph, group: dict, round_to: int, members: dict[int, list[int]]) -> int:
    """How many of a group's removable units make a multiple of ``round_to`` channels: a unit is one channel,
    or a whole attention head of D features (then round_to / gcd(round_to, D) heads, 1 when D is a multiple)."""
    root, layer = group["roots"][0], group["layers"][0]
    width = sum(1 for e in members[root] if cg.owners[e][:2] == ("layer", layer)) or 1
    return max(1, round_to // math.gcd(round_to, width))


def rounded_counts(cg: ChannelGraph, ratios: dict[str, float], round_to: int, reached: Callable[[dict], bool]
                   ) -> dict[tuple, int]:
    """Channels to remove per group (group layers -> count), multiples of ``round_to`` (keeping at least
    ``round_to``), that still meet the budget: each group starts at its planned removal rounded down, then
    the group with the largest shortfall against its plan removes ``round_to`` more, one step at a time,
    until ``reached(counts)`` holds (or nothing more can go). Rounding every group the same way at once
    would move the total in coarse jumps (every 16-channel group from 16 to 8 together) and miss the target."""
    groups = [g for g in cg.groups() if g["prunable"]]
    members = cg.classes()
    steps = [group_step(cg, g, round_to, members) for g in groups]
    want = [group_ratio(cg, g, ratios) * g["channels"] for g in groups]
    removed = [min(int(w // st) * st, max(g["channels"] - st, 0)) for g, w, st in zip(groups, want, steps, strict=True)]

    def counts() -> dict[tuple, int]:
        return {tuple(g["layers"]): r for g, r in zip(groups, removed, strict=True)}

    while not reached(counts()):
        room = [k for k, g in enumerate(groups) if removed[k] + steps[k] <= g["channels"] - steps[k]]
        if not room:
            break
        k = max(room, key=lambda k: (want[k] - removed[k], -k))
        removed[k] += steps[k]
    return counts()


def kept_fractions(cg: ChannelGraph, remove: set[int]) -> dict[str, tuple[float, float]]:
    """Layer name -> (fraction of input channels kept, fraction of output channels kept) after removing
    ``remove``: a layer's weights and FLOPs scale with their product (a depthwise layer's with one of them)."""
    by_node = {layer.node: name for name, layer in cg.layers.items()}
    out: dict[str, list[float]] = {}
    for edit in cg.edits:
        if edit.kind not in ("weight_out", "weight_in") or edit.node not in by_node:
            continue
        frac = len(_kept(cg, edit.elems, remove)) / len(edit.elems) if edit.elems else 1.0
        entry = out.setdefault(by_node[edit.node], [1.0, 1.0])
        entry[0 if edit.kind == "weight_in" else 1] = frac
    return {name: (kin, kout) for name, (kin, kout) in out.items()}


def predict(cg: ChannelGraph, remove: set[int]) -> tuple[int, int]:
    """(parameters removed, FLOPs per sample removed) from the layers, without rewriting anything."""
    params = flops = 0.0
    for name, (kin, kout) in kept_fractions(cg, remove).items():
        layer = cg.layers[name]
        w = float(np.prod(layer.weight_shape))
        params += w * (1 - kin * kout) + (layer.params - w) * (1 - kout)
        flops += (layer.flops or 0) * (1 - kin * kout)
    return int(round(params)), int(round(flops))


def _kept(cg: ChannelGraph, elems: list[int], remove: set[int]) -> list[int]:
    return [i for i, e in enumerate(elems) if cg.find(e) not in remove]


def _new_initializer(graph: ir.Graph, base: str, array: np.ndarray | ir.LazyTensor) -> ir.Value:
    name, k = f"{base}_shrunk", 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_shrunk{k}"
    if isinstance(array, ir.LazyTensor):
        tensor, dtype = array, array.dtype
        tensor.name = name
    else:
        tensor, dtype = ir.tensor(array, name=name), ir.DataType.from_numpy(array.dtype)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _take(arr: np.ndarray, cut: dict[int, list[int]]) -> np.ndarray:
    for axis, keep in cut.items():
        arr = np.take(arr, keep, axis=axis)
    return np.ascontiguousarray(arr)


def shrink(model: ir.Model, cg: ChannelGraph, remove: set[int]) -> int:
    """Rewrite the graph without the channels of the ``remove`` classes. Returns the number of edits."""
    graph = model.graph
    weight_keep: dict[ir.Node, dict[int, list[int]]] = {}
    done = 0
    for edit in cg.edits:
        keep = _kept(cg, edit.elems, remove)
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
        elif edit.kind == "reshape":
            target = np.array(edit.extra["target"], copy=True)
            if target[edit.axis] > 0:
                target[edit.axis] = len(keep)
                edit.node.replace_input_with(1, _new_initializer(graph, edit.node.inputs[1].name, target))
        done += 1
    layers_by_node = {layer.node: layer for layer in cg.layers.values()}
    for node, axes in weight_keep.items():
        layer = layers_by_node[node]
        src = node.inputs[layer.weight_input]
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
        node.replace_input_with(layer.weight_input, _new_initializer(graph, src.name, new))
        done += 1
    _forget_shapes(graph)
    return done


def _param(graph: ir.Graph, edit: Edit, keep: list[int]) -> None:
    src = edit.node.inputs[edit.input_index]
    arr = constant_array(src)  # the graph's current value (a refit may have changed it) ...
    if arr is None:  # ... or the one the analysis folded from a small constant computation
        arr = edit.extra["value"]
    new = np.ascontiguousarray(np.take(arr, keep, axis=edit.axis))
    edit.node.replace_input_with(edit.input_index, _new_initializer(graph, src.name, new))


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
        node.replace_input_with(1, _new_initializer(graph, node.inputs[1].name, target))
        return
    for k, v in values.items():
        src = source.inputs[k]
        source.replace_input_with(k, _new_initializer(graph, src.name, np.array([v], np.int64)))


def _pad(graph: ir.Graph, cg: ChannelGraph, edit: Edit, remove: set[int]) -> None:
    before = len(_kept(cg, edit.extra["before"], remove))
    after = len(_kept(cg, edit.extra["after"], remove))
    axes, pads = edit.extra["axes"], list(edit.extra["pads"])
    k = axes.index(edit.axis)
    if pads[k] == before and pads[len(axes) + k] == after:
        return
    pads[k], pads[len(axes) + k] = before, after
    src = edit.node.inputs[1]
    edit.node.replace_input_with(1, _new_initializer(graph, src.name, np.array(pads, np.int64)))


def _forget_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes are stale after shrinking: drop them (shape inference recomputes them)."""
    keep = set(graph.inputs) | set(graph.outputs)
    for node in graph:
        for v in node.outputs:
            if v not in keep:
                v.shape = None
