"""Measured per-layer sensitivity to magnitude pruning: for each layer alone and each sparsity of a grid,
the drop of the model's outputs against the unmodified model on calibration data.

Metrics per point: ``kl`` (mean KL divergence of the output distributions, no labels needed),
``agreement`` (percent of samples whose top-1 prediction is unchanged), ``top1`` (percent correct, with
labels) for class scores, and ``error`` (onnxprune.runtime.metrics.output_error, over every output) for
outputs of any kind, the default when the outputs are not class scores. Evaluation is partial-graph
(onnxprune.runtime.partial): the unmodified model runs once per batch, each layer's variants run only the
graph from that layer on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from onnxprune.analysis.graph import GraphInfo, analyse_graph
from onnxprune.analysis.layers import Layer, find_layers
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan, Scores, check_fingerprint, curve_drop, load_plan
from onnxprune.errors import InputError
from onnxprune.io import model_copy
from onnxprune.runtime.backend import Backend
from onnxprune.runtime.metrics import Reference, output_error
from onnxprune.runtime.partial import Part, PartialEvaluator
from onnxprune.runtime.session import model_session
from onnxprune.scoring.common import (
    DEFAULT_MAX_MEMORY,
    Progress,
    ScoreRequest,
    calibration,
    choose_metric,
    chunks,
    layer_entry,
    memory_groups,
    received,
    relative_to_max,
    sample_count,
    shipped,
    suffix_weight_bytes,
    untaken_branches,
)
from onnxprune.tensors.masks import magnitude_order, pruned_copy
from onnxprune.tensors.weights import get_weight, set_weight

__all__ = ["DEFAULT_GRID", "METRICS", "DropAccumulator", "check_compactness", "check_sensitivity", "layer_compactness",
           "layer_sensitivity", "score_compactness", "score_sensitivity"]

DEFAULT_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
METRICS = ("kl", "agreement", "top1", "error")


class DropAccumulator:
    """Sums of KL, agreement, correct predictions and output error of a modified model against the reference."""

    def __init__(self):
        self.kl = 0.0
        self.agree = 0
        self.correct = 0
        self.error = 0.0
        self.n = 0
        self.labelled = 0

    def update(self, ref: Reference, outs: list[np.ndarray], labels: np.ndarray | None):
        logp = Reference.of(outs).logp
        self.kl += float(np.sum(np.exp(ref.logp) * (ref.logp - logp)))
        top = logp.argmax(axis=1)
        self.agree += int(np.sum(top == ref.top))
        self.error += float(output_error(ref.outputs, outs).sum())
        self.n += len(top)
        if labels is not None:
            self.correct += int(np.sum(top == labels.reshape(-1)))
            self.labelled += len(labels)

    def result(self) -> dict:
        n = max(self.n, 1)
        r = {"kl": self.kl / n, "agreement": 100.0 * self.agree / n, "error": self.error / n}
        if self.labelled:
            r["top1"] = 100.0 * self.correct / self.labelled
        return r


def layer_sensitivity(
    model, info: GraphInfo, layers: list[Layer], batches: Iterable[tuple[dict, np.ndarray | None]],
    grid: tuple[float, ...] = DEFAULT_GRID, provider: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    at: dict[str, float] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, list[dict]], dict]:
    """Per layer, a curve [{sparsity, kl, agreement, top1?}] starting at sparsity 0, and the reference metrics.

    ``at``: measure around a plan instead of around the dense model: every other layer is magnitude-pruned
    to its planned sparsity while one layer varies over the grid (conditional curves); drops are still
    against the unmodified model. ``batches`` must be a list: it is consumed batch by batch, every layer
    variant evaluated on each batch before the next, so memory holds one batch's activations.
    """
    weights = {layer.name: np.asarray(get_weight(layer)) for layer in layers}
    reference = None
    if at:
        reference = model_session(model, provider, threads)
        model = model_copy(model)
        info = analyse_graph(model)
        by_name = {layer.name: layer for layer in find_layers(info)}
        for name, sp in at.items():
            w = weights[name]
            set_weight(by_name[name], pruned_copy(w, magnitude_order(w), int(round(sp * w.size))))
        layers = [by_name[layer.name] for layer in layers]
    evaluator = PartialEvaluator(model, info, [Part(layer.name, layer.main_nodes, [layer.weight]) for layer in layers],
                                 provider=provider, threads=threads)
    variants: dict[str, list[tuple[float, np.ndarray]]] = {}
    for layer in layers:
        w = weights[layer.name]
        order = magnitude_order(w)
        variants[layer.name] = [(sp, pruned_copy(w, order, int(round(sp * w.size)))) for sp in grid]
    acc = {(layer.name, sp): DropAccumulator() for layer in layers for sp in grid}
    ref = DropAccumulator()
    batches = list(batches)
    total, done = len(batches) * len(layers), 0
    at_point = DropAccumulator()
    for feeds, labels in batches:
        acts = evaluator.run_prefix(feeds)
        outs = [acts[name] for name in evaluator.output_names]
        dense = Reference.of(outs if reference is None else reference.run(feeds, evaluator.output_names))
        ref.update(dense, dense.outputs, labels)
        at_point.update(dense, outs, labels)
        for layer in layers:
            for sp, w in variants[layer.name]:
                out = evaluator.run_part(layer.name, acts, {layer.weight: w})
                acc[(layer.name, sp)].update(dense, out, labels)
            done += 1
            if progress:
                progress(done, total)
    base = ref.result()
    base["kl"] = base["error"] = 0.0
    if at:  # sparsity 0 of a layer, the others at the plan, needs its own run: use the grid's 0 if measured
        curves = {layer.name: [{"sparsity": sp, **acc[(layer.name, sp)].result()} for sp in grid] for layer in layers}
        return curves, {**base, "at_plan": at_point.result()}
    curves = {
        layer.name: [{"sparsity": 0.0, **base}] + [{"sparsity": sp, **acc[(layer.name, sp)].result()} for sp in grid]
        for layer in layers
    }
    return curves, ref.result()


def layer_compactness(
    model, info: GraphInfo, layers: list[Layer], batches: list[tuple[dict, np.ndarray | None]],
    tolerance: float = 1.0, steps: int = 8, max_sparsity: float = 0.99, provider: str = "cpu",
    progress: Callable[[int, int], None] | None = None, criterion: str | None = None, threads: int | None = None,
) -> tuple[dict[str, dict], dict]:
    """For each layer alone, the highest magnitude-pruning sparsity whose drop stays within ``tolerance``
    (percentage points of ``criterion``: by default top-1 with labels, else top-1 agreement with the
    unmodified model; ``error`` for outputs that are not class scores), found by
    bisection over [0, max_sparsity] in ``steps`` halvings. The unmodified model runs once; each probe runs
    only the graph from the layer on, over the cached activations of every calibration batch."""
    evaluator = PartialEvaluator(model, info, [Part(layer.name, layer.main_nodes, [layer.weight]) for layer in layers],
                                 provider=provider, threads=threads)
    cached = []
    ref = DropAccumulator()
    for feeds, labels in batches:
        acts = evaluator.run_prefix(feeds)
        dense = Reference.of([acts[name] for name in evaluator.output_names])
        cached.append((acts, labels, dense))
        ref.update(dense, dense.outputs, labels)
    base = ref.result()
    criterion = criterion or ("top1" if "top1" in base else "agreement")
    results: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        w = np.asarray(get_weight(layer))
        order = magnitude_order(w)

        def drop(sp: float) -> float:
            pruned = pruned_copy(w, order, int(round(sp * w.size)))
            acc = DropAccumulator()
            for acts, labels, dense in cached:
                acc.update(dense, evaluator.run_part(layer.name, acts, {layer.weight: pruned}), labels)
            return curve_drop(acc.result(), base, criterion)

        lo, hi = 0.0, max_sparsity
        if drop(hi) <= tolerance:
            lo = hi
        else:
            for _ in range(steps):
                mid = (lo + hi) / 2
                if drop(mid) <= tolerance:
                    lo = mid
                else:
                    hi = mid
        results[layer.name] = {"compactness": lo, "criterion": criterion}
        if progress:
            progress(i + 1, len(layers))
    return results, base


MEASURES = {"sensitivity": layer_sensitivity, "compactness": layer_compactness}


def _fanned_out(am: AnalysedModel, backend: Backend, measure: str, layers: list[Layer], progress, **options
                ) -> tuple[dict, dict]:
    """``MEASURES[measure]`` of ``layers``: here, in groups of consecutive layers whose suffix sessions fit in
    DEFAULT_MAX_MEMORY together (a pass over the data each: a model of several GB does not hold a session
    per layer at once), or on ``backend`` in tasks of consecutive layers. Each layer's result depends only
    on it and the data, so the merged results are the same however the layers are cut."""
    if backend.kind == "local":
        weight_bytes = suffix_weight_bytes(am.model, [(layer.name, layer.main_nodes) for layer in layers])
        groups = memory_groups(layers, lambda layer: weight_bytes[layer.name], DEFAULT_MAX_MEMORY)
        parts, done = [], 0
        for group in groups:
            ticks = None if progress is None else (  # a group's steps are per layer (x batches): one bar over all
                lambda k, total, d=done, n=len(group): progress(d * total // n + k, len(layers) * total // n))
            parts.append(MEASURES[measure](am.model, am.info, group, progress=ticks, **options))
            done += len(group)
    else:
        shared = {**shipped(am), "measure": measure, "options": options, "threads": backend.task_threads}
        parts = backend.map(_layers_task, chunks([layer.name for layer in layers], backend), shared, progress)
    return {k: v for found, _ in parts for k, v in found.items()}, parts[0][1]


def _layers_task(shared: dict, names: list[str]) -> tuple[dict, dict]:
    """A Ray task: one measure of the layers ``names`` on the model rebuilt from ``shared``."""
    am = received(shared)
    by_name = {layer.name: layer for layer in am.layers}
    return MEASURES[shared["measure"]](am.model, am.info, [by_name[n] for n in names], threads=shared["threads"],
                                       **shared["options"])


def check_sensitivity(request: ScoreRequest) -> None:
    metric = request.metric
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown sensitivity metric {metric!r}; use one of {', '.join(METRICS)}")
    if not all(0 <= g < 1 for g in tuple(request.grid or DEFAULT_GRID)):
        raise InputError(f"--grid sparsities must be in (0, 1), got {tuple(request.grid or DEFAULT_GRID)}")


def score_sensitivity(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    """Each layer's drop curve under magnitude pruning; importance = mean drop / the largest."""
    grid = tuple(request.grid or DEFAULT_GRID)
    layers, provider, batches = calibration(am, request.data, request.backend)
    metric, note = choose_metric(am, request.metric, batches, classifier_default="kl")
    at_sparsities = None
    if request.at is not None:
        at_plan = request.at if isinstance(request.at, Plan) else load_plan(request.at)
        check_fingerprint(at_plan.fingerprint, am.fingerprint, "plan given to --at", False)
        at_sparsities = at_plan.sparsities()
        grid = tuple(sorted(set(grid) | {0.0}))
    t0 = time.perf_counter()
    curves, base = _fanned_out(am, request.backend, "sensitivity", layers, progress, batches=batches, grid=grid,
                               provider=provider, at=at_sparsities)
    seconds = time.perf_counter() - t0
    unscored = untaken_branches(am, layers, batches, provider)
    units = []
    for layer in layers:
        curve = curves[layer.name]
        drops = [curve_drop(p, base, metric) for p in curve[1:]]
        units.append({**layer_entry(am, layer), "curve": curve, "mean_drop": float(np.mean(drops))})
        if layer.name in unscored:  # kept whole by plans from these scores: the data says nothing of it
            units[-1].update(curve=curve[:1], mean_drop=None, unscored=unscored[layer.name])
    scored = relative_to_max([u["mean_drop"] for u in units if u["mean_drop"] is not None])
    for u in units:
        u["importance"] = 1.0 if u["mean_drop"] is None else scored.pop(0)
    return Scores(method="sensitivity", fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                  units=units, metric=metric,
                  options={"grid": list(grid), "samples": sample_count(batches), "data": request.data.record(),
                           "provider": provider, "reference": base, "at": at_sparsities, "metric_note": note,
                           **request.backend.record(),
                           "definition": "output drop of the model with only this layer magnitude-pruned"},
                  timing={"seconds": round(seconds, 3)})


def check_compactness(request: ScoreRequest) -> None:
    if not request.tolerance > 0:
        raise InputError(f"--tolerance must be positive (percentage points), got {request.tolerance:g}")


def score_compactness(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    """Each layer's compactness (highest sparsity within the tolerance); importance = 1 - compactness."""
    layers, provider, batches = calibration(am, request.data, request.backend)
    criterion, note = choose_metric(am, None, batches, classifier_default=None)
    t0 = time.perf_counter()
    results, base = _fanned_out(am, request.backend, "compactness", layers, progress, batches=batches,
                                tolerance=request.tolerance, provider=provider, criterion=criterion)
    unscored = untaken_branches(am, layers, batches, provider)
    units = []
    for layer in layers:
        c = 0.0 if layer.name in unscored else results[layer.name]["compactness"]
        units.append({**layer_entry(am, layer), "metrics": {"compactness": c},
                      "importance": max(1.0 - c, 0.01), "criterion": results[layer.name]["criterion"]})
        if layer.name in unscored:
            units[-1]["unscored"] = unscored[layer.name]
    return Scores(method="compactness", fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                  units=units, metric="compactness",
                  options={"tolerance": request.tolerance, "samples": sample_count(batches),
                           "data": request.data.record(), "reference": base, "provider": provider,
                           **request.backend.record(), "metric_note": note,
                           "definition": "highest sparsity of this layer alone whose drop stays within the "
                                         "tolerance; importance = 1 - compactness (at least 0.01)"},
                  timing={"seconds": round(time.perf_counter() - t0, 3)})
