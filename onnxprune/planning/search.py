"""Allocation by measured search: per-layer sparsities chosen by evaluating whole pruned models.

Every allocation rule in onnxprune.planning.allocation scores layers one at a time (or not at all); at high sparsity
the layers' effects interact. ``search`` measures instead: the objective (``loss``) is the mean KL divergence
between the unmodified model's and the pruned model's output distributions on calibration data (no labels
needed) when the outputs are class scores, else the output error of every output
(onnxprune.runtime.metrics.output_error), the pruned model being magnitude-pruned in every layer at the
candidate sparsities.

1. Seeds: LAMP, ERK and uniform allocations, the sensitivity allocation when sensitivity scores are given,
   and the halfway mix of LAMP and sensitivity; the best seed starts the search.
2. Evolutionary (1+1) search in the spirit of EvoPress (Sieberling et al. 2024): a mutation moves budget
   between random pairs of layers (the budget-weighted total stays exactly the same, bounds are respected);
   it is kept if the objective improves. ``iterations`` mutations, seeded random generator.

Each evaluation is one ONNX Runtime run over the calibration batch with every layer's weight fed as an
input (one session, no re-serialisation); masks come from a per-layer magnitude order computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.planning.allocation import Allocatable, allocate_sparsities
from onnxprune.runtime.graph_io import weights_as_inputs
from onnxprune.runtime.metrics import log_softmax, output_error
from onnxprune.runtime.session import model_session
from onnxprune.tensors.masks import magnitude_order, pruned_copy
from onnxprune.tensors.weights import get_weight

__all__ = ["SearchLog", "search_allocation"]


@dataclass
class SearchLog:
    seeds: dict[str, float]
    start: str
    objective: str  # kl | error
    start_loss: float
    final_loss: float
    accepted: int
    iterations: int
    evaluations: int


class _Objective:
    """The loss of the pruned model against the dense one on calibration feeds, for per-layer sparsities:
    KL(dense || pruned) of class scores (``metric="kl"``), or the mean output error (``"error"``)."""

    def __init__(self, model: ir.Model, units: Sequence[Allocatable], feeds: list[dict[str, np.ndarray]],
                 provider: str, metric: str = "kl"):
        names = {u.layer.weight for u in units}
        self.session = model_session(model, provider,  # (it feeds bfloat16 weights too)
                                     edit=lambda proto: weights_as_inputs(proto, names))
        self.outputs = [o.name for o in self.session.session.get_outputs()][:1 if metric == "kl" else None]
        self.metric = metric
        self.units = units
        self.dense = {u.layer.weight: np.asarray(get_weight(u.layer)) for u in units}
        self.order = {k: magnitude_order(w) for k, w in self.dense.items()}
        self.feeds = feeds
        self.ref = [self._run(f, self.dense) for f in feeds]
        self.evaluations = 0

    def _run(self, feeds, weights) -> list[np.ndarray]:
        return self.session.run({**feeds, **weights}, self.outputs)

    def weights(self, sparsities: np.ndarray) -> dict[str, np.ndarray]:
        return {
            u.layer.weight: pruned_copy(self.dense[u.layer.weight], self.order[u.layer.weight],
                                        int(round(s * self.dense[u.layer.weight].size)))
            for u, s in zip(self.units, sparsities, strict=True)
        }

    def __call__(self, sparsities: np.ndarray) -> float:
        self.evaluations += 1
        weights = self.weights(sparsities)
        loss, n = 0.0, 0
        for feeds, ref in zip(self.feeds, self.ref, strict=True):
            outs = self._run(feeds, weights)
            if self.metric == "kl":
                ref_logp, logp = log_softmax(ref[0]), log_softmax(outs[0])
                loss += float(np.sum(np.exp(ref_logp) * (ref_logp - logp)))
            else:
                loss += float(output_error(ref, outs).sum())
            n += len(ref[0])
        return loss / n


def search_allocation(
    model: ir.Model, units: Sequence[Allocatable], target: float, budget_weights: np.ndarray,
    feeds: list[dict[str, np.ndarray]], *, iterations: int = 150, seed: int = 0, provider: str = "cpu",
    progress: Callable[[int, int], None] | None = None, metric: str = "kl",
) -> tuple[np.ndarray, SearchLog]:
    objective = _Objective(model, units, feeds, provider, metric)
    lo = np.array([u.lo for u in units])
    hi = np.array([u.hi for u in units])
    w = budget_weights.astype(np.float64)
    budget = "params" if np.array_equal(w, [u.n for u in units]) else "flops"
    seeds: dict[str, np.ndarray] = {}
    for method in ("lamp", "erk", "uniform"):
        seeds[method] = allocate_sparsities(units, method, target, budget)
    if all(u.curve for u in units):
        seeds["sensitivity"] = allocate_sparsities(units, "sensitivity", target, budget)
        seeds["lamp+sensitivity"] = (seeds["lamp"] + seeds["sensitivity"]) / 2
    values = {name: objective(s) for name, s in seeds.items()}
    start = min(values, key=values.get)
    current, best = seeds[start].copy(), values[start]
    start_total = float(np.dot(w, current))
    rng = np.random.default_rng(seed)
    accepted = 0
    total = float(w.sum())
    for it in range(iterations):
        cand = current.copy()
        for _ in range(rng.integers(1, 4)):  # 1-3 pair moves per mutation
            i, j = rng.choice(len(units), size=2, replace=False)
            # move budget mass from j to i (more sparsity in i, less in j), within both bounds
            room = min((hi[i] - cand[i]) * w[i], (cand[j] - lo[j]) * w[j])
            if room <= 0:
                continue
            mass = room * rng.uniform(0.05, 0.5) if room < 0.02 * total else min(room, 0.02 * total) * rng.uniform(0.1, 1)
            cand[i] += mass / w[i]
            cand[j] -= mass / w[j]
        value = objective(cand)
        if value < best:
            current, best = cand, value
            accepted += 1
        if progress:
            progress(it + 1, iterations)
    if abs(float(np.dot(w, current)) - start_total) > 1e-6 * total:  # mutations move budget, never add any
        raise RuntimeError("the search drifted off the budget")
    log = SearchLog(seeds={k: round(v, 6) for k, v in values.items()}, start=start, objective=metric,
                    start_loss=values[start], final_loss=best, accepted=accepted, iterations=iterations,
                    evaluations=objective.evaluations)
    return current, log
