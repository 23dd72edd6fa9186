"""Budgets -> per-layer sparsities. Every method has the same signature and returns the same type.

All methods reduce to one rule: each layer's sparsity is a non-decreasing function s_l(x) of one scalar x,
clipped to the layer's bounds [a_l, b_l]; x is found by bisection so that the budget-weighted total

    S(x) = sum_l w_l * s_l(x) / sum_l w_l          (w_l = weight count, or FLOPs with --budget flops)

equals the target. The methods differ in s_l:

- capacity:  s_l(x) = clip(1 - I_l / x, a_l, b_l): the density (1 - s) is proportional to the importance
             I_l (capacity metric / max), so a more important layer never gets a higher sparsity.
- uniform:   s_l(x) = clip(x, a_l, b_l).
- erk:       as capacity with I_l = (sum of the weight's dimensions) / (product of them) (Evci et al.).
- global:    s_l(t) = clip(fraction of |w| < t in layer l): one magnitude threshold t across layers.
- lamp:      s_l(t) = clip(fraction of LAMP scores < t), LAMP score of w = w^2 / (sum of w'^2 over the
             weights of the same layer with |w'| >= |w|) (Lee et al. 2021): one threshold on the scores.
- sensitivity: from measured curves D_l(s) (the model's output drop with layer l alone pruned to s; see
             onnxprune.scoring.sensitivity), minimise sum_l D_l(s_l) subject to the budget: each curve is
             replaced by its lower convex hull on [a_l, b_l], and hull segments are taken in order of
             increasing cost per budget unit (dD / (w_l ds)) until the target is met, the last one partly.
             This is exact for convex curves (a greedy Lagrangian solution); it assumes drops add up.

Per-layer counts are then rounded (zeros_l = round(s_l * n_l)) and the plan records the exact fractions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.layers import Layer
from onnxprune.errors import InputError
from onnxprune.tensors.weights import get_weight, release_weight

__all__ = ["RULES", "TOLERANCE", "Allocatable", "Allocation", "allocate", "allocate_measured", "allocate_sparsities"]

RULES = ("capacity", "uniform", "global", "lamp", "erk", "sensitivity")  # the rules s_l(x) above
TOLERANCE = 0.001  # the total must be met to within 0.1 % (absolute sparsity)


@dataclass
class Allocatable:
    """One prunable weight tensor as the allocator sees it."""

    name: str
    n: int  # weight elements
    flops: int  # FLOPs of every layer using this weight
    layer: Layer
    importance: float | None = None
    lo: float = 0.0
    hi: float = 0.99
    curve: list[tuple[float, float]] | None = None  # (sparsity, drop) points, for sensitivity


@dataclass
class Allocation:
    sparsities: dict[str, float]  # exact fractions zeros / n
    zeros: dict[str, int]
    total: float  # achieved budget-weighted sparsity
    total_params: float
    total_flops: float


def _weights(units: Sequence[Allocatable], budget: str) -> np.ndarray:
    if budget == "params":
        return np.array([u.n for u in units], np.float64)
    if budget == "flops":
        w = np.array([u.flops for u in units], np.float64)
        if not w.sum() > 0:
            raise InputError("--budget flops needs FLOPs, which shape inference could not determine; use --budget params")
        return w
    raise InputError(f"unknown budget {budget!r}; use params or flops")


def _weight_share(units: Sequence[Allocatable], budget: str) -> np.ndarray:
    """The budget fraction one zeroed weight of each layer removes."""
    total = _weights(units, budget)
    n = np.array([max(u.n, 1) for u in units], np.float64)
    return total / total.sum() / n


def _bisect(fn: Callable[[float], np.ndarray], weights: np.ndarray, target: float, lo: float, hi: float,
            log: bool = False, iters: int = 100) -> np.ndarray:
    total = float(weights.sum())

    def s_total(x):
        return float(np.dot(weights, fn(x))) / total

    for _ in range(iters):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        if s_total(mid) < target:
            lo = mid
        else:
            hi = mid
    s_lo, s_hi = fn(lo), fn(hi)
    return s_hi if abs(s_total(hi) - target) <= abs(s_total(lo) - target) else s_lo


def _proportional(importance: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    imp = np.maximum(importance, 1e-12)
    return lambda x: np.clip(1.0 - imp / x, lo, hi)


# Layers above this many weights keep a sketch of their sorted scores (SKETCH evenly spaced order statistics)
# instead of all of them: the fraction below a threshold is then known to 1/SKETCH of the layer (1.5e-5), and
# memory stays a few MB per layer instead of 8 bytes per weight (a 2 GB model would need 4 GB more).
SKETCH_ABOVE, SKETCH = 1 << 20, 1 << 16


def _sorted_scores(units: Sequence[Allocatable], kind: str) -> list[np.ndarray | tuple[np.ndarray, np.ndarray, int]]:
    """Per layer, its scores in ascending order: all of them, or (values, positions, size) for big layers."""
    out = []
    for u in units:
        w2 = np.sort(np.square(np.asarray(get_weight(u.layer), dtype=np.float64).reshape(-1)))
        if kind == "global":
            scores = np.sqrt(w2, out=w2)
        else:  # lamp: w_i^2 / sum_{j >= i} w_j^2 over the ascending order
            suffix = np.cumsum(w2[::-1])[::-1]
            scores = np.divide(w2, suffix, out=np.zeros_like(w2), where=suffix > 0)
            del suffix
        release_weight(u.layer)
        if scores.size > SKETCH_ABOVE:
            positions = np.linspace(0, scores.size - 1, SKETCH).astype(np.int64)
            out.append((scores[positions].copy(), positions, scores.size))
        else:
            out.append(scores)
        del w2, scores
    return out


def _count_below(scores, t: float) -> float:
    if isinstance(scores, tuple):
        values, positions, size = scores
        k = int(np.searchsorted(values, t, side="left"))
        return float(positions[k]) if k < len(values) else float(size)
    return float(np.searchsorted(scores, t, side="left"))


def _size(scores) -> int:
    return scores[2] if isinstance(scores, tuple) else scores.size


def _top(scores) -> float:
    return float(scores[0][-1]) if isinstance(scores, tuple) else float(scores[-1])


def allocate_sparsities(
    units: Sequence[Allocatable], method: str, target: float, budget: str = "params"
) -> np.ndarray:
    """Per-unit sparsities (before rounding) meeting ``target`` under ``budget``."""
    if method not in RULES:
        raise InputError(f"unknown allocation method {method!r}; use one of {', '.join(RULES)}")
    weights = _weights(units, budget)
    lo = np.array([u.lo for u in units])
    hi = np.array([u.hi for u in units])
    if method == "sensitivity":
        if any(not u.curve for u in units):
            missing = next(u.name for u in units if not u.curve)
            raise InputError(f"no sensitivity curve for layer {missing!r}; run onnxprune score --method sensitivity")
        hi = np.minimum(hi, [max(s for s, _ in u.curve) for u in units])
    total = float(weights.sum())
    reach_lo, reach_hi = float(np.dot(weights, lo)) / total, float(np.dot(weights, hi)) / total
    if not reach_lo - 1e-9 <= target <= reach_hi + 1e-9:  # a target a rounding away from a bound is met at it
        raise InputError(
            f"target sparsity {target:g} cannot be met within the bounds (reachable {reach_lo:.4f} .. "
            f"{reach_hi:.4f} with the given --min-sparsity/--max-sparsity/--keep-dense); relax them"
        )
    if method == "sensitivity":
        return _hull_allocation(units, weights, target, lo, hi)
    if method == "uniform":
        return _bisect(lambda x: np.clip(np.full(len(units), x), lo, hi), weights, target, 0.0, 1.0)
    if method in ("capacity", "erk"):
        if method == "capacity":
            if any(u.importance is None for u in units):
                missing = next(u.name for u in units if u.importance is None)
                raise InputError(f"no importance for layer {missing!r} in the scores; run onnxprune score first")
            imp = np.array([u.importance for u in units], np.float64)
        else:
            imp = np.array([sum(u.layer.weight_shape) / max(u.n, 1) for u in units], np.float64)
        return _bisect(_proportional(imp, lo, hi), weights, target, 1e-12, 1e12, log=True)
    scores = _sorted_scores(units, method)
    top = max((_top(s) for s in scores if _size(s)), default=1.0) * 1.0001 + 1e-30

    def by_threshold(t):
        frac = np.array([_count_below(s, t) / max(_size(s), 1) for s in scores])
        return np.clip(frac, lo, hi)

    return _bisect(by_threshold, weights, target, 0.0, top)


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _clipped_curve(curve: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    xs = np.array([c[0] for c in curve])
    ys = np.array([c[1] for c in curve])
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    inner = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if lo < x < hi]
    return [(lo, float(np.interp(lo, xs, ys)))] + inner + ([(hi, float(np.interp(hi, xs, ys)))] if hi > lo else [])


def _hull_allocation(units: Sequence[Allocatable], weights: np.ndarray, target: float, lo: np.ndarray,
                     hi: np.ndarray) -> np.ndarray:
    s = lo.astype(np.float64).copy()
    need = target * float(weights.sum()) - float(np.dot(weights, lo))
    segments = []
    for i, u in enumerate(units):
        if weights[i] <= 0:
            continue
        hull = _lower_hull(_clipped_curve(u.curve, float(lo[i]), float(hi[i])))
        for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
            if x2 > x1:
                segments.append(((y2 - y1) / ((x2 - x1) * weights[i]), x1, i, x2 - x1))
    for _, _, i, length in sorted(segments, key=lambda seg: (seg[0], seg[1], seg[2])):
        if need <= 1e-12:
            break
        take = min(length, need / weights[i])
        s[i] += take
        need -= take * weights[i]
    return np.minimum(s, hi)


def allocate(
    units: Sequence[Allocatable], method: str, target: float, budget: str = "params"
) -> Allocation:
    _check_request(units, target)
    return _finish(units, allocate_sparsities(units, method, target, budget), method, target, budget)


def allocate_measured(units: Sequence[Allocatable], target: float, budget: str, solver) -> tuple[Allocation, object]:
    """Like allocate, with the sparsities from ``solver(units, target, budget_weights) -> (sparsities, log)``."""
    _check_request(units, target)
    s, log = solver(units, target, _weights(units, budget))
    return _finish(units, s, "search", target, budget), log


def _check_request(units: Sequence[Allocatable], target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise InputError(f"--target-sparsity must be in [0, 1), got {target:g}")
    if not units:
        raise InputError("the model has no prunable layers to allocate sparsity to")


def _round_counts(units: Sequence[Allocatable], s: np.ndarray, target: float, budget: str) -> np.ndarray:
    """Whole zero counts from continuous sparsities: each layer gets floor or ceil of s * n (largest fractional
    parts first, within its bounds: at least ceil(lo * n), at most floor(hi * n)) so that the budget total comes
    as close to the target as whole weights allow. Plain rounding per layer misses the target by up to half a
    weight per layer (small models)."""
    n = np.array([u.n for u in units], np.float64)
    raw = np.clip(np.asarray(s, np.float64), 0.0, 1.0) * n
    cap = np.floor(np.array([u.hi for u in units]) * n + 1e-9)
    least = np.minimum(np.ceil(np.array([u.lo for u in units]) * n - 1e-9), cap)  # --min-sparsity, in whole weights
    zeros = np.maximum(np.floor(raw + 1e-9), least)
    w = _weight_share(units, budget)
    deficit = target - float(np.dot(w, zeros))
    for i in np.argsort(-(raw - zeros), kind="stable"):
        if deficit <= 0:
            break
        if raw[i] > zeros[i] and zeros[i] < cap[i] and deficit >= w[i] / 2:
            zeros[i] += 1
            deficit -= w[i]
    return zeros.astype(np.int64)


def _finish(units: Sequence[Allocatable], s: np.ndarray, method: str, target: float, budget: str) -> Allocation:
    counts = _round_counts(units, s, target, budget)
    zeros = {u.name: int(c) for u, c in zip(units, counts, strict=True)}
    fracs = {u.name: zeros[u.name] / u.n if u.n else 0.0 for u in units}
    n = np.array([u.n for u in units], np.float64)
    f = np.array([u.flops for u in units], np.float64)
    sv = np.array([fracs[u.name] for u in units])
    total_params = float(np.dot(n, sv) / n.sum())
    total_flops = float(np.dot(f, sv) / f.sum()) if f.sum() > 0 else float("nan")
    achieved = total_params if budget == "params" else total_flops
    # within 0.1 %, or within one weight where a single weight is a bigger step than that (small models)
    if abs(achieved - target) > max(TOLERANCE, float(_weight_share(units, budget).max(initial=0.0))):
        raise InputError(
            f"{method} could not meet the target {target:g} (reached {achieved:.4f}): many equal weights or "
            "tight bounds; try another method or relax the bounds"
        )
    return Allocation(fracs, zeros, achieved, total_params, total_flops)
