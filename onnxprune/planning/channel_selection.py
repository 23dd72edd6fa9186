"""Which whole channels to remove: per coupled group, the lowest by the L1 or L2 norm of their filters.

The channel dependency analysis (onnxprune.analysis.channels) says which channels are tied together; the
selector picks, in each prunable group, the channels to remove (the lowest by the L1 or L2 norm of their
filters, summed over the group's layers after dividing by each layer's mean norm, as every layer of a group
loses the same channels), rounds kept counts to multiples of N, and predicts the parameters and FLOPs the
removal takes away. The rewrite itself is onnxprune.passes.shrink.ShrinkChannelsPass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.channels import ChannelGraph
from onnxprune.analysis.layers import out_in_axes
from onnxprune.tensors.weights import get_weight, release_weight

__all__ = ["CRITERIA", "ChannelSelector", "GroupChoice", "choose", "filter_norms", "group_ratio", "group_step",
           "kept_fractions", "predict", "rounded_counts"]

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


class ChannelSelector:
    """Chooses the channels to remove in a channel graph by ``criterion``. The filter norms, and each group's
    channels ranked by them, are computed once per selector (allocation chooses dozens of times; on a big
    model each norm computation reads every weight); weights must not change while a selector is in use."""

    def __init__(self, cg: ChannelGraph, criterion: str = "l2"):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}")
        self.cg, self.criterion = cg, criterion
        self._norms: dict[str, np.ndarray] | None = None
        self._ranked: dict[tuple, list[int]] = {}

    def norms(self) -> dict[str, np.ndarray]:
        """Each producing layer's filter norms over their mean."""
        if self._norms is None:
            self._norms = {}
            for name in self.cg.produced:
                n = filter_norms(self.cg.layers[name], self.criterion)
                self._norms[name] = n / (float(n.mean()) or 1.0)
                release_weight(self.cg.layers[name])
        return self._norms

    def ranked(self, group: dict) -> list[int]:
        """A group's channel classes, lowest summed normalised norm first (ties by class)."""
        key = tuple(group["layers"])
        if key not in self._ranked:
            norms, members, owners = self.norms(), self.cg.classes(), self.cg.owners
            score = {}
            for root in group["roots"]:
                total = 0.0
                for e in members[root]:
                    kind, name, idx = owners[e]
                    if kind == "layer" and name in norms:
                        total += norms[name][idx]
                score[root] = total
            self._ranked[key] = sorted(group["roots"], key=lambda r: (score[r], r))
        return self._ranked[key]

    def choose(self, ratios: dict[str, float], round_to: int = 1, counts: dict[tuple, int] | None = None
               ) -> tuple[set[int], list[GroupChoice]]:
        """See :func:`choose`."""
        cg = self.cg
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
            if kept < n:
                remove.update(self.ranked(g)[: n - kept])
            choices.append(GroupChoice(g["layers"], n, n - kept, ratio))
        return remove, choices


def choose(cg: ChannelGraph, ratios: dict[str, float], criterion: str = "l2", round_to: int = 1,
           counts: dict[tuple, int] | None = None) -> tuple[set[int], list[GroupChoice]]:
    """The class roots to remove and what was chosen per group. ``ratios``: layer name -> fraction of its
    output channels to remove (from a plan's per-layer sparsities). A group takes the mean of its layers'
    ratios weighted by their parameters; its kept channel count is rounded to a multiple of ``round_to``
    (never below it, never above the group's size). ``counts`` (group layers -> channels to remove), where it
    names a group, overrides the ratios (a plan's rounded counts)."""
    return ChannelSelector(cg, criterion).choose(ratios, round_to, counts)


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


def rounded_counts(cg: ChannelGraph, ratios: dict[str, float], round_to: int, reached: Callable[[dict], bool],
                   finest: int | None = None) -> tuple[dict[tuple, int], int]:
    """Channels to remove per group (group layers -> count), multiples of ``round_to`` (keeping at least
    ``round_to``), that still meet the budget: each group starts at its planned removal rounded down, then
    the group with the largest shortfall against its plan removes ``round_to`` more, one step at a time,
    until ``reached(counts)`` holds (or nothing more can go). Rounding every group the same way at once
    would move the total in coarse jumps (every 16-channel group from 16 to 8 together) and miss the target.

    With ``finest`` below ``round_to``, when no more whole steps of ``round_to`` can go the steps halve (down
    to ``finest``) and the greedy goes on: only the cuts the coarse steps could not make leave the multiple.
    Returns the counts and the finest multiple used."""
    groups = [g for g in cg.groups() if g["prunable"]]
    members = cg.classes()
    want = [group_ratio(cg, g, ratios) * g["channels"] for g in groups]
    multiple = round_to
    steps = [group_step(cg, g, multiple, members) for g in groups]
    removed = [min(int(w // st) * st, max(g["channels"] - st, 0)) for g, w, st in zip(groups, want, steps, strict=True)]

    def counts() -> dict[tuple, int]:
        return {tuple(g["layers"]): r for g, r in zip(groups, removed, strict=True)}

    while not reached(counts()):
        room = [k for k, g in enumerate(groups) if removed[k] + steps[k] <= g["channels"] - steps[k]]
        if not room:
            if finest is None or multiple // 2 < finest:
                break
            multiple //= 2
            steps = [group_step(cg, g, multiple, members) for g in groups]
            continue
        if multiple == round_to:
            k = max(room, key=lambda k: (want[k] - removed[k], -k))
        else:  # a finer step takes the layers it touches off the multiple: touch as few as possible
            k = min(room, key=lambda k: (len(groups[k]["layers"]), -(want[k] - removed[k]), k))
        removed[k] += steps[k]
    return counts(), multiple


def kept_fractions(cg: ChannelGraph, remove: set[int]) -> dict[str, tuple[float, float]]:
    """Layer name -> (fraction of input channels kept, fraction of output channels kept) after removing
    ``remove``: a layer's weights and FLOPs scale with their product (a depthwise layer's with one of them)."""
    by_node = {layer.node: name for name, layer in cg.layers.items()}
    out: dict[str, list[float]] = {}
    for edit in cg.edits:
        if edit.kind not in ("weight_out", "weight_in") or edit.node not in by_node:
            continue
        frac = len(cg.kept(edit.elems, remove)) / len(edit.elems) if edit.elems else 1.0
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
