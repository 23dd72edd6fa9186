"""Unstructured plans: a sparsity per layer from a rule (onnxprune.planning.allocation) or from the search
over whole pruned models (onnxprune.planning.search), as a plan.json."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan, Scores
from onnxprune.planning import allocation
from onnxprune.planning.search import search_allocation
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import calibration_batches
from onnxprune.runtime.metrics import class_scores

__all__ = ["plan_search", "plan_sparsity"]


def plan_sparsity(am: AnalysedModel, units: Sequence[allocation.Allocatable], method: str, target: float,
                  budget: str, options: dict) -> Plan:
    """Every layer's sparsity by the rule ``method`` so that the budget-weighted total meets ``target``."""
    return _plan(am, units, method, target, budget, options, allocation.allocate(units, method, target, budget))


def plan_search(am: AnalysedModel, units: Sequence[allocation.Allocatable], target: float, budget: str,
                scores: Scores | None, spec: rdata.DataSpec, iterations: int, seed: int,
                progress: Callable[[int, int], None] | None, options: dict) -> Plan:
    """The sparsities a (1+1) search finds best on calibration data; starts from sensitivity curves when
    ``scores`` has them."""
    if scores is not None and scores.method == "sensitivity":
        curves = scores.curves()
        for u in units:
            if u.name in curves:
                u.curve = curves[u.name]
    provider, batches = calibration_batches(am.model, spec)
    feeds = [f for f, _ in batches]
    metric = "kl" if class_scores([am.info.shape(v) for v in am.model.graph.outputs]) else "error"
    result, log = allocation.allocate_measured(
        units, target, budget,
        lambda s_units, t, weights: search_allocation(am.model, s_units, t, weights, feeds, iterations=iterations,
                                                      seed=seed, provider=provider, progress=progress,
                                                      metric=metric))
    options = {**options, "search": {**log.__dict__, "seed": seed, "data": spec.record()}}
    return _plan(am, units, "search", target, budget, options, result, seed=seed)


def _plan(am: AnalysedModel, units, method: str, target: float, budget: str, options: dict,
          result: allocation.Allocation, seed: int | None = None) -> Plan:
    plan_layers = [
        {"name": u.name, "sparsity": result.sparsities[u.name], "granularity": "unstructured", "method": method,
         "weight": u.layer.weight, "params": u.n, "zeros": result.zeros[u.name], "flops": u.flops,
         **({"importance": u.importance} if u.importance is not None else {})}
        for u in units
    ]
    totals = {
        "target": target, "budget": budget, "sparsity": result.total,
        "params_sparsity": result.total_params, "flops_sparsity": None if am.unknown_dims else result.total_flops,
        "weights": sum(u.n for u in units), "zeros": sum(result.zeros.values()),
    }
    return Plan(method=method, fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                layers=plan_layers, totals=totals, budget=budget,
                options=options, seed=seed)
