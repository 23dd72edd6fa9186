"""Measured per-layer sensitivity to magnitude pruning: for each layer alone and each sparsity of a grid,
the drop of the model's outputs against the unmodified model on calibration data.

Metrics per point: ``kl`` (mean KL divergence of the output distributions, no labels needed),
``agreement`` (percent of samples whose top-1 prediction is unchanged) and ``top1`` (percent correct, with
labels). Evaluation is partial-graph (onnxprune.runtime.partial): the unmodified model runs once per batch,
each layer's variants run only the graph from that layer on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import GraphInfo, analyse_graph
from onnxprune.analysis.layers import Layer, find_layers
from onnxprune.passes.sparsify import magnitude_order, pruned_copy
from onnxprune.runtime.partial import PartialEvaluator, Unit
from onnxprune.runtime.session import create_session
from onnxprune.weights import get_weight, set_weight

DEFAULT_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class DropAccumulator:
    """Sums of KL, agreement and correct predictions of a modified model against the reference outputs."""

    def __init__(self):
        self.kl = 0.0
        self.agree = 0
        self.correct = 0
        self.n = 0
        self.labelled = 0

    def update(self, ref_logp: np.ndarray, ref_top: np.ndarray, out: np.ndarray, labels: np.ndarray | None):
        logp = log_softmax(out)
        self.kl += float(np.sum(np.exp(ref_logp) * (ref_logp - logp)))
        top = logp.argmax(axis=1)
        self.agree += int(np.sum(top == ref_top))
        self.n += out.shape[0]
        if labels is not None:
            self.correct += int(np.sum(top == labels.reshape(-1)))
            self.labelled += len(labels)

    def result(self) -> dict:
        r = {"kl": self.kl / max(self.n, 1), "agreement": 100.0 * self.agree / max(self.n, 1)}
        if self.labelled:
            r["top1"] = 100.0 * self.correct / self.labelled
        return r


def layer_sensitivity(
    model, info: GraphInfo, layers: list[Layer], batches: Iterable[tuple[dict, np.ndarray | None]],
    grid: tuple[float, ...] = DEFAULT_GRID, provider: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    at: dict[str, float] | None = None,
) -> tuple[dict[str, list[dict]], dict]:
    """Per layer, a curve [{sparsity, kl, agreement, top1?}] starting at sparsity 0, and the reference metrics.

    ``at``: measure around a plan instead of around the dense model: every other layer is magnitude-pruned
    to its planned sparsity while one layer varies over the grid (conditional curves); drops are still
    against the unmodified model. ``batches`` must be a list: it is consumed batch by batch, every layer
    variant evaluated on each batch before the next, so memory holds one batch's activations.
    """
    dense = {layer.name: np.asarray(get_weight(layer)) for layer in layers}
    reference = None
    if at:
        reference = create_session(ir.serde.serialize_model(model).SerializeToString(), provider)
        model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        info = analyse_graph(model)
        by_name = {layer.name: layer for layer in find_layers(info)}
        for name, sp in at.items():
            w = dense[name]
            set_weight(by_name[name], pruned_copy(w, magnitude_order(w), int(round(sp * w.size))))
        layers = [by_name[layer.name] for layer in layers]
    evaluator = PartialEvaluator(model, info, [Unit(layer.name, [layer.name], [layer.weight]) for layer in layers],
                                 provider=provider)
    variants: dict[str, list[tuple[float, np.ndarray]]] = {}
    for layer in layers:
        w = dense[layer.name]
        order = magnitude_order(w)
        variants[layer.name] = [(sp, pruned_copy(w, order, int(round(sp * w.size)))) for sp in grid]
    acc = {(layer.name, sp): DropAccumulator() for layer in layers for sp in grid}
    ref = DropAccumulator()
    batches = list(batches)
    total, done = len(batches) * len(layers), 0
    at_point = DropAccumulator()
    for feeds, labels in batches:
        acts = evaluator.run_prefix(feeds)
        out0 = acts[evaluator.output_names[0]]
        if reference is not None:
            dense_out = reference.run(feeds, [evaluator.output_names[0]])[0]
        else:
            dense_out = out0
        ref_logp = log_softmax(dense_out)
        ref_top = ref_logp.argmax(axis=1)
        ref.update(ref_logp, ref_top, dense_out, labels)
        at_point.update(ref_logp, ref_top, out0, labels)
        for layer in layers:
            for sp, w in variants[layer.name]:
                out = evaluator.run_unit(layer.name, acts, {layer.weight: w})[0]
                acc[(layer.name, sp)].update(ref_logp, ref_top, out, labels)
            done += 1
            if progress:
                progress(done, total)
    base = ref.result()
    base["kl"] = 0.0
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, dict], dict]:
    """For each layer alone, the highest magnitude-pruning sparsity whose drop stays within ``tolerance``
    (percentage points of top-1 with labels, else of top-1 agreement with the unmodified model), found by
    bisection over [0, max_sparsity] in ``steps`` halvings. The unmodified model runs once; each probe runs
    only the graph from the layer on, over the cached activations of every calibration batch."""
    evaluator = PartialEvaluator(model, info, [Unit(layer.name, [layer.name], [layer.weight]) for layer in layers],
                                 provider=provider)
    cached = []
    ref = DropAccumulator()
    for feeds, labels in batches:
        acts = evaluator.run_prefix(feeds)
        logp = log_softmax(acts[evaluator.output_names[0]])
        cached.append((acts, labels, logp, logp.argmax(axis=1)))
        ref.update(logp, logp.argmax(axis=1), acts[evaluator.output_names[0]], labels)
    base = ref.result()
    use_top1 = "top1" in base
    results: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        w = np.asarray(get_weight(layer))
        order = magnitude_order(w)

        def drop(sp: float) -> float:
            pruned = pruned_copy(w, order, int(round(sp * w.size)))
            acc = DropAccumulator()
            for acts, labels, logp, top in cached:
                out = evaluator.run_unit(layer.name, acts, {layer.weight: pruned})[0]
                acc.update(logp, top, out, labels)
            r = acc.result()
            return base["top1"] - r["top1"] if use_top1 else 100.0 - r["agreement"]

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
        results[layer.name] = {"compactness": lo, "criterion": "top1" if use_top1 else "agreement"}
        if progress:
            progress(i + 1, len(layers))
    return results, base
