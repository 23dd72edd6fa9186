"""SR-init: sensitivity of each residual block (or layer) to stochastic re-initialisation.

Each unit's weights are replaced by a fresh initialisation, as a newly built model of the same architecture
would have it (Tang et al. 2023, reference code checked): conv / linear weights Kaiming-normal (fan_in, ReLU
gain: std = sqrt(2 / fan_in)), biases zero (in an ONNX export BatchNorm is usually folded into the conv, so
that is the fresh-init equivalent), and a BatchNormalization still in the graph gets its fresh state (scale
1, shift 0, mean 0, variance 1). One seeded generator draws every layer's weights in graph order, as one
fresh model would; ``seeds`` > 1 repeats with the next seeds.

The drop is baseline - re-initialised on the same samples: ``top1`` (points, needs labels), ``agreement``
(points of top-1 predictions that change), ``kl`` (mean KL of the output distributions). Each comes with
its standard error over samples (paired per-sample differences) and, for several seeds, the spread over
seeds. Evaluation is partial-graph: the unmodified model runs once per batch, each unit runs only the graph
from its first node on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxprune.analysis.graph import GraphInfo, constant_array
from onnxprune.analysis.layers import Layer
from onnxprune.runtime.partial import PartialEvaluator, Unit
from onnxprune.scoring.sensitivity import log_softmax
from onnxprune.weights import get_weight, out_in_axes

METRICS = ("top1", "agreement", "kl")


def fresh_init(layers: list[Layer], graph_nodes: dict, seed: int) -> dict[str, np.ndarray]:
    """Value name -> fresh array for every layer weight, bias and following BatchNorm parameter."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    values = {v.name: v for layer in layers for n in (layer.node, *layer.node.outputs[0].consumers())
              for v in n.inputs if v is not None}
    for layer in layers:
        w = np.asarray(get_weight(layer))
        _, in_axis = out_in_axes(layer)
        fan_in = int(np.prod(w.shape)) // int(w.shape[out_in_axes(layer)[0]])
        if layer.op_type in ("Gemm", "MatMul"):
            fan_in = int(w.shape[in_axis])
        out[layer.weight] = (rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_in)).astype(w.dtype)
        if layer.bias is not None:
            out[layer.bias] = np.zeros_like(constant_array(values[layer.bias]))
        if layer.bn is not None:
            bn = graph_nodes[layer.bn]
            for i, fill in zip(range(1, 5), (1.0, 0.0, 0.0, 1.0), strict=True):
                v = bn.inputs[i]
                out[v.name] = np.full_like(constant_array(v), fill)
    return out


class _Paired:
    """Per-sample paired differences against the baseline, summed for mean and standard error."""

    def __init__(self):
        self.sums = {m: 0.0 for m in METRICS}
        self.squares = {m: 0.0 for m in METRICS}
        self.n = 0
        self.labelled = 0

    def add(self, metric: str, diffs: np.ndarray) -> None:
        self.sums[metric] += float(diffs.sum())
        self.squares[metric] += float((diffs ** 2).sum())

    def stats(self, metric: str, count: int, scale: float) -> tuple[float, float]:
        if count == 0:
            return float("nan"), float("nan")
        mean = self.sums[metric] / count
        var = max(self.squares[metric] / count - mean ** 2, 0.0) * count / max(count - 1, 1)
        return mean * scale, np.sqrt(var / count) * scale


def srinit_scores(
    model, info: GraphInfo, units: list[tuple[str, list[str], list[Layer]]], batches: list,
    seeds: list[int], provider: str = "cpu", progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, dict], dict]:
    """units: (name, node names, layers). Returns per unit {metric: drop, metric_se, (metric_seed_std)} and
    the baseline metrics."""
    nodes = {n.name: n for n in info.graph}
    all_layers = [layer for _, _, layers in units for layer in layers]
    inits = {seed: fresh_init(all_layers, nodes, seed) for seed in seeds}
    weight_names = {name: sorted({k for layer in layers for k in _param_names(layer, nodes)})
                    for name, _, layers in units}
    evaluator = PartialEvaluator(model, info, [Unit(name, node_names, weight_names[name])
                                               for name, node_names, _ in units], provider=provider)
    acc = {(name, seed): _Paired() for name, _, _ in units for seed in seeds}
    base_correct, n, labelled = 0, 0, 0
    total, done = len(batches) * len(units), 0
    for feeds, labels in batches:
        acts = evaluator.run_prefix(feeds)
        ref_logp = log_softmax(acts[evaluator.output_names[0]])
        ref_top = ref_logp.argmax(axis=1)
        ref_ok = None if labels is None else (ref_top == labels.reshape(-1)).astype(np.float64)
        n += len(ref_top)
        if ref_ok is not None:
            base_correct += int(ref_ok.sum())
            labelled += len(ref_ok)
        for name, _, _ in units:
            for seed in seeds:
                weights = {k: inits[seed][k] for k in weight_names[name]}
                logp = log_softmax(evaluator.run_unit(name, acts, weights)[0])
                top = logp.argmax(axis=1)
                p = acc[(name, seed)]
                p.add("agreement", (top != ref_top).astype(np.float64))
                p.add("kl", np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=1))
                if ref_ok is not None:
                    p.add("top1", ref_ok - (top == labels.reshape(-1)))
            done += 1
            if progress:
                progress(done, total)
    results = {}
    for name, _, _ in units:
        r: dict = {}
        for metric in METRICS:
            count = labelled if metric == "top1" else n
            scale = 1.0 if metric == "kl" else 100.0
            per_seed = [acc[(name, seed)].stats(metric, count, scale) for seed in seeds]
            r[metric] = float(np.mean([m for m, _ in per_seed]))
            r[f"{metric}_se"] = float(np.mean([se for _, se in per_seed]))
            if len(seeds) > 1:
                r[f"{metric}_seed_std"] = float(np.std([m for m, _ in per_seed], ddof=1))
        results[name] = r
    base = {"samples": n, "agreement": 100.0, "kl": 0.0}
    if labelled:
        base["top1"] = 100.0 * base_correct / labelled
    return results, base


def _param_names(layer: Layer, nodes: dict) -> list[str]:
    names = [layer.weight]
    if layer.bias is not None:
        names.append(layer.bias)
    if layer.bn is not None:
        names += [v.name for v in nodes[layer.bn].inputs[1:5] if v is not None]
    return names
