"""SR-init: sensitivity of each residual block (or layer) to stochastic re-initialisation.

Each unit's weights are replaced by a fresh initialisation, as a newly built model of the same architecture
would have it (Tang et al. 2023, reference code checked): conv / linear weights Kaiming-normal (fan_in, ReLU
gain: std = sqrt(2 / fan_in)), biases zero (in an ONNX export BatchNorm is usually folded into the conv, so
that is the fresh-init equivalent), and a BatchNormalization still in the graph gets its fresh state (scale
1, shift 0, mean 0, variance 1), as do other normalisations inside the unit (a transformer block's
LayerNorm: scale 1, shift 0). One seeded generator draws every layer's weights in graph order, as one
fresh model would; ``seeds`` > 1 repeats with the next seeds.

The drop is baseline - re-initialised on the same samples: ``top1`` (points, needs labels), ``agreement``
(points of top-1 predictions that change), ``kl`` (mean KL of the output distributions). Each comes with
its standard error over samples (paired per-sample differences) and, for several seeds, the spread over
seeds. Evaluation is partial-graph: the unmodified model runs once per batch, each unit runs only the graph
from its first node on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import GraphInfo, constant_array
from onnxprune.analysis.layers import Layer
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Scores
from onnxprune.errors import InputError
from onnxprune.runtime.backend import Backend
from onnxprune.runtime.language_model import TokenReference, decoder_of
from onnxprune.runtime.metrics import Reference, output_error
from onnxprune.runtime.partial import Part, PartialEvaluator
from onnxprune.scoring.common import (
    DEFAULT_MAX_MEMORY,
    Progress,
    ScoreRequest,
    batch_slices,
    block_units,
    calibration,
    choose_metric,
    layer_entry,
    memory_groups,
    received,
    relative_to_max,
    shipped,
    suffix_weight_bytes,
    unit_entry,
    untaken_branches,
)
from onnxprune.tensors.nbits import is_nbits, nbits_weight, quantize, stored_inputs
from onnxprune.tensors.weights import get_weight, out_in_axes

__all__ = ["DEFAULT_MAX_MEMORY", "METRICS", "UNIT_KINDS", "check", "fresh_init", "fresh_norms", "score_srinit",
           "srinit_scores"]

METRICS = ("top1", "agreement", "kl", "error")


def fresh_init(layers: list[Layer], graph_nodes: dict, seed: int, keep: set[str] | None = None
               ) -> dict[str, np.ndarray]:
    """Value name -> fresh array for every layer weight, bias and following BatchNorm parameter. ``keep``:
    only these layers' arrays are returned (every layer is still drawn in order, so each gets the draw it
    gets in the whole model, but a task holds only its own units' fresh weights)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    values = {v.name: v for layer in layers for n in (layer.node, *layer.node.outputs[0].consumers())
              for v in n.inputs if v is not None}
    for layer in layers:
        w = np.asarray(get_weight(layer))
        _, in_axis = out_in_axes(layer)
        fan_in = int(np.prod(w.shape)) // int(w.shape[out_in_axes(layer)[0]])
        if layer.op_type not in ("Conv", "ConvTranspose"):  # matrices, recurrent weights: the input axis
            fan_in = int(w.shape[in_axis])
        draw = rng.standard_normal(w.shape)
        if keep is not None and layer.name not in keep:
            continue
        fresh = (draw * np.sqrt(2.0 / fan_in)).astype(w.dtype)
        if is_nbits(layer.node):  # stored quantised: the fresh matrix on a grid of its own
            stored = stored_inputs(quantize(fresh, nbits_weight(layer.node)))
            out.update({layer.node.inputs[i].name: array for i, array in stored.items()})
        else:
            out[layer.weight] = fresh
        if layer.bias is not None:
            out[layer.bias] = np.zeros_like(constant_array(values[layer.bias]))
        if layer.bn is not None:
            bn = graph_nodes[layer.bn]
            for i, fill in zip(range(1, 5), (1.0, 0.0, 0.0, 1.0), strict=True):
                v = bn.inputs[i]
                out[v.name] = np.full_like(constant_array(v), fill)
    return out


_NORM_FILLS = {  # op -> fresh value of inputs 1.. (scale 1, shift 0; BatchNorm: mean 0, variance 1)
    "BatchNormalization": (1.0, 0.0, 0.0, 1.0),
    "LayerNormalization": (1.0, 0.0),
    "InstanceNormalization": (1.0, 0.0),
    "GroupNormalization": (1.0, 0.0),
}


def fresh_norms(nodes) -> dict[str, np.ndarray]:
    """Value name -> fresh array for the constant parameters of the normalisation nodes among ``nodes``
    (a LayerNorm inside a transformer block, a BatchNorm kept in the graph): what a new model starts with."""
    out: dict[str, np.ndarray] = {}
    for node in nodes:
        for v, fill in zip(node.inputs[1:], _NORM_FILLS.get(node.op_type, ()), strict=False):
            direct = v is not None and (v.const_value is not None
                                        or (v.producer() is not None and v.producer().op_type == "Constant"))
            if direct:
                out[v.name] = np.full_like(constant_array(v), fill)
    return out


class _Paired:
    """Per-sample paired differences against the baseline: each batch's sum and sum of squares, kept in batch
    order so that passes over parts of the data merge (``extend``) into the sums one pass would give."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {m: [] for m in METRICS}
        self.squares: dict[str, list[float]] = {m: [] for m in METRICS}

    def add(self, metric: str, diffs: np.ndarray) -> None:
        self.sums[metric].append(float(diffs.sum()))
        self.squares[metric].append(float((diffs ** 2).sum()))

    def extend(self, later: _Paired) -> _Paired:
        """This pass followed by ``later``, a pass over the batches after this one's."""
        for metric in METRICS:
            self.sums[metric] += later.sums[metric]
            self.squares[metric] += later.squares[metric]
        return self

    def stats(self, metric: str, count: int, scale: float) -> tuple[float, float]:
        if count == 0:
            return float("nan"), float("nan")
        mean = sum(self.sums[metric]) / count  # the same list gives the same bits, however it was split
        var = max(sum(self.squares[metric]) / count - mean ** 2, 0.0) * count / max(count - 1, 1)
        return mean * scale, np.sqrt(var / count) * scale


UNIT_KINDS = ("blocks", "transformer-layers", "layers")  # what --units re-initialises


def srinit_scores(
    model, info: GraphInfo, units: list[tuple[str, list[str], list[Layer]]], batches: list,
    seeds: list[int], provider: str = "cpu", progress: Callable[[int, int], None] | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY, logits: str | None = None, backend: Backend = Backend(),
    model_shipped: dict | None = None,
) -> tuple[dict[str, dict], dict]:
    """units: (name, node names, layers). Returns per unit {metric: drop, metric_se, (metric_seed_std),
    seconds} and the baseline metrics, and the number of passes over the data. ``logits``: the output that
    holds a language model's logits (batch, positions, vocabulary): ``kl`` and ``agreement`` are then per
    sequence, averaged over its positions.

    Each (unit, seed) gets a suffix session with that seed's weights built in (injected when the session is
    made, never serialised), so it runs as fast as the unmodified graph. For each batch the unmodified model
    runs once and keeps the activations entering every unit; every suffix session then runs on them and the
    batch's activations are dropped. The sessions are made once and kept while they fit in ``max_memory``
    (with the batch's activations); when they do not, they are taken in groups that fit, and the data is
    passed once per group.

    ``backend`` ray: the same groups times slices of the batches (``_on_cluster``), each task on a worker
    that rebuilds the model from ``model_shipped`` (scoring.common.shipped, put in the object store once);
    the per-batch sums are merged in unit and batch order, so every number equals the local path's.
    """
    pairs = [(name, seed) for name, _, _ in units for seed in seeds]
    if backend.kind != "local":
        return _on_cluster(model, units, pairs, batches, seeds, provider, progress, logits, max_memory, backend,
                           model_shipped)
    evaluator, inits, weight_names = _evaluator(model, info, units, units, seeds, provider)
    first = evaluator.run_prefix(batches[0][0]) if batches else {}
    acts_bytes = sum(a.nbytes for a in first.values())
    if acts_bytes >= max_memory:
        raise InputError(f"one batch of activations takes {acts_bytes / 2**20:.0f} MiB, over --max-memory "
                         f"({max_memory / 2**20:.0f} MiB); lower --batch-size or raise --max-memory")
    weight_bytes = {name: evaluator.weight_bytes(name) for name, _, _ in units}
    groups = memory_groups(pairs, lambda pair: weight_bytes[pair[0]], max_memory - acts_bytes)
    acc, seconds, counts = {}, {name: 0.0 for name, _, _ in units}, {}
    done = [0]
    total = len(batches) * len(pairs)

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    for g, group in enumerate(groups):
        part, group_counts = _run_pairs(evaluator, inits, weight_names, group, batches, logits, seconds, tick,
                                        first if g == 0 else None)
        acc.update(part)
        counts = counts or group_counts
        first = {}
    return _summary(units, seeds, acc, counts, seconds, passes=len(groups))


def _evaluator(model, info: GraphInfo, all_units: list, units: list, seeds: list[int], provider: str,
               threads: int | None = None):
    """The partial-graph evaluator of ``units`` with each seed's fresh weights; the draws cover the layers
    of ``all_units`` in order (one fresh model), so a unit gets the same weights whichever units run with it."""
    nodes = {n.name: n for n in info.graph}
    all_layers = [layer for _, _, layers in all_units for layer in layers]
    norms = {name: fresh_norms(nodes[n] for n in node_names if n in nodes) for name, node_names, _ in units}
    own = {layer.name for _, _, layers in units for layer in layers}
    inits = {seed: fresh_init(all_layers, nodes, seed, keep=own) for seed in seeds}
    for seed in seeds:
        for fresh in norms.values():
            inits[seed].update(fresh)
    weight_names = {name: sorted({k for layer in layers for k in _param_names(layer, nodes)} | set(norms[name]))
                    for name, _, layers in units}
    evaluator = PartialEvaluator(model, info, [Part(name, node_names, weight_names[name])
                                               for name, node_names, _ in units],
                                 provider=provider, threads=threads, inject="initializers")
    return evaluator, inits, weight_names


def _run_pairs(evaluator: PartialEvaluator, inits: dict, weight_names: dict, pairs: list, batches: list,
               logits: str | None, seconds: dict, tick: Callable[[], None], first: dict | None = None
               ) -> tuple[dict, dict]:
    """One pass over ``batches`` for the (unit, seed) ``pairs``: their per-sample differences, and the
    sample counts of the pass. ``first``: the first batch's prefix activations, when already computed."""
    token_at = None if logits is None else evaluator.output_names.index(logits)
    acc = {pair: _Paired() for pair in pairs}
    counts = {"n": 0, "labelled": 0, "correct": 0}
    sessions = {}
    for name, seed in pairs:
        t0 = time.perf_counter()
        sessions[(name, seed)] = evaluator.bind(name, {k: inits[seed][k] for k in weight_names[name]})
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    for b, (feeds, labels) in enumerate(batches):
        acts = first if b == 0 and first else evaluator.run_prefix(feeds)
        refs = [acts[name] for name in evaluator.output_names]
        ref = None if token_at is not None else Reference.of(refs)
        tokens = None if token_at is None else TokenReference(refs[token_at], evaluator.threads or os.cpu_count())
        ref_ok = None if labels is None or ref is None else (ref.top == labels.reshape(-1)).astype(np.float64)
        counts["n"] += len(refs[0])
        if ref_ok is not None:
            counts["correct"] += int(ref_ok.sum())
            counts["labelled"] += len(ref_ok)
        for (name, seed), bound in sessions.items():
            t0 = time.perf_counter()
            outs = bound.run(acts)
            p = acc[(name, seed)]
            p.add("error", output_error(refs, outs))
            if token_at is not None:  # a language model: next-token distributions at every position
                p.add("agreement", tokens.disagreement(outs[token_at]))
                p.add("kl", tokens.kl(outs[token_at]))
            else:
                logp = Reference.of(outs).logp
                top = logp.argmax(axis=1)
                p.add("agreement", (top != ref.top).astype(np.float64))
                p.add("kl", np.sum(np.exp(ref.logp) * (ref.logp - logp), axis=1))
                if ref_ok is not None:
                    p.add("top1", ref_ok - (top == labels.reshape(-1)))
            seconds[name] += time.perf_counter() - t0
            tick()
        del acts
    return acc, counts


def _on_cluster(model: ir.Model, units: list, pairs: list, batches: list, seeds: list[int], provider: str,
                progress, logits: str | None, max_memory: int, backend: Backend, model_shipped: dict
                ) -> tuple[dict[str, dict], dict]:
    """srinit_scores on Ray. The (unit, seed) pairs are grouped as the local path groups them (sessions that
    fit in ``max_memory`` together; each group costs a pass of the whole model over the data), and the
    batches are cut into slices so that groups x slices is about twice what the cluster runs at once: a
    task is one group on one slice. The per-batch sums are merged in unit and batch order."""
    shared = {**model_shipped, "batches": batches, "seeds": seeds, "provider": provider, "logits": logits,
              "units": [(name, nodes, [layer.name for layer in layers]) for name, nodes, layers in units],
              "threads": backend.task_threads}
    weight_bytes = suffix_weight_bytes(model, [(name, nodes) for name, nodes, _ in units])
    groups = memory_groups(pairs, lambda pair: weight_bytes[pair[0]], max_memory)
    tasks = [(group, start, stop) for group in groups
             for start, stop in batch_slices(len(batches), len(groups), backend)]
    found = backend.map(_unit_task, tasks, shared, progress)
    acc: dict = {}
    counts = {"n": 0, "labelled": 0, "correct": 0}
    seconds = {name: 0.0 for name, _, _ in units}
    for (group, _, _), (part, part_counts, part_seconds, _) in zip(tasks, found, strict=True):
        for pair in group:
            acc[pair] = acc[pair].extend(part[pair]) if pair in acc else part[pair]
        if group is groups[0]:  # the samples are counted once: by the first group's tasks
            counts = {k: counts[k] + part_counts[k] for k in counts}
        for name, sec in part_seconds.items():
            seconds[name] += sec
    results, base = _summary(units, seeds, acc, counts, seconds, passes=len(groups))
    base["ran_on"] = sorted({ran_on for *_, ran_on in found if ran_on})  # what each worker's sessions got
    return results, base


def _unit_task(shared: dict, task: tuple[list, int, int]) -> tuple[dict, dict, dict, str | None]:
    """A Ray task: (unit, seed) pairs on a model loaded from the shared bytes, one pass over batches
    [start, stop). Also returns the provider its sessions really got (None when it ran no batch)."""
    pairs, start, stop = task
    am = received(shared)
    by_name = {layer.name: layer for layer in am.layers}
    all_units = [(name, nodes, [by_name[n] for n in layers]) for name, nodes, layers in shared["units"]]
    names = {name for name, _ in pairs}
    units = [u for u in all_units if u[0] in names]
    evaluator, inits, weight_names = _evaluator(am.model, am.info, all_units, units, shared["seeds"],
                                                shared["provider"], shared["threads"])
    seconds: dict = {}
    acc, counts = _run_pairs(evaluator, inits, weight_names, pairs, shared["batches"][start:stop],
                             shared["logits"], seconds, lambda: None)
    return acc, counts, seconds, evaluator.ran_on


def _summary(units: list, seeds: list[int], acc: dict, counts: dict, seconds: dict, passes: int
             ) -> tuple[dict[str, dict], dict]:
    n, labelled = counts.get("n", 0), counts.get("labelled", 0)
    results = {}
    for name, _, _ in units:
        r: dict = {}
        for metric in METRICS:
            count = labelled if metric == "top1" else n
            scale = 100.0 if metric in ("top1", "agreement") else 1.0  # error is in percent already
            per_seed = [acc[(name, seed)].stats(metric, count, scale) for seed in seeds]
            r[metric] = float(np.mean([m for m, _ in per_seed]))
            r[f"{metric}_se"] = float(np.mean([se for _, se in per_seed]))
            if len(seeds) > 1:
                r[f"{metric}_seed_std"] = float(np.std([m for m, _ in per_seed], ddof=1))
        r["seconds"] = round(seconds.get(name, 0.0), 3)
        results[name] = r
    base = {"samples": n, "agreement": 100.0, "kl": 0.0, "error": 0.0, "passes": passes}
    if labelled:
        base["top1"] = 100.0 * counts["correct"] / labelled
    return results, base


def _param_names(layer: Layer, nodes: dict) -> list[str]:
    # quantised: B, its scales and stored zero points
    names = [v.name for v in layer.node.inputs[2:4] if v is not None] if is_nbits(layer.node) else []
    names.append(layer.weight)
    if layer.bias is not None:
        names.append(layer.bias)
    if layer.bn is not None:
        names += [v.name for v in nodes[layer.bn].inputs[1:5] if v is not None]
    return names


def check(request: ScoreRequest) -> None:
    metric = request.metric
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown SR-init metric {metric!r}; use one of {', '.join(METRICS)}")
    if request.units not in UNIT_KINDS:
        raise InputError(f"--units must be one of {', '.join(UNIT_KINDS)}, got {request.units!r}")
    if request.seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {request.seeds}")
    if request.max_memory is not None and request.max_memory < 1:
        raise InputError(f"--max-memory must be positive, got {request.max_memory}")


def score_srinit(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    """Each residual block's (or layer's) drop when re-initialised; importance = drop / the largest."""
    seed, seeds = request.seed, request.seeds
    max_memory = DEFAULT_MAX_MEMORY if request.max_memory is None else request.max_memory
    layers, provider, batches = calibration(am, request.data, request.backend)
    metric, note = choose_metric(am, request.metric, batches, classifier_default=None)
    by_name = {layer.name: layer for layer in layers}
    if request.units in ("blocks", "transformer-layers"):
        groups = block_units(am, request.units)
        unit_defs = [(name, [n for b in members for n in b.nodes],
                      [by_name[n] for b in members for n in b.layers if n in by_name]) for name, members in groups]
        entries = {name: unit_entry(name, members, request.units) for name, members in groups}
    else:
        unit_defs = [(layer.name, layer.main_nodes, [layer]) for layer in layers]
        entries = {layer.name: {**layer_entry(am, layer), "kind": "layer"} for layer in layers}
    t0 = time.perf_counter()
    results, base = srinit_scores(am.model, am.info, unit_defs, batches, list(range(seed, seed + seeds)),
                                  provider=provider, progress=progress, max_memory=max_memory,
                                  logits=decoder.logits if (decoder := decoder_of(am.model)) else None,
                                  backend=request.backend,
                                  model_shipped=shipped(am) if request.backend.kind != "local" else None)
    seconds = time.perf_counter() - t0
    passes = base.pop("passes")
    provider = ", ".join(base.pop("ran_on", None) or [provider])  # on a cluster: what the workers got
    out = []
    unit_seconds = {}
    for name, _, _ in unit_defs:
        r = results[name]
        unit_seconds[name] = r.pop("seconds")
        extra = {"drop_seed_std": r[f"{metric}_seed_std"]} if seeds > 1 else {}
        out.append({**entries[name], "drop": r[metric], "drop_se": r[f"{metric}_se"], **extra, "metrics": r,
                    "importance": r[metric]})
    unscored = untaken_branches(am, layers, batches, provider) if request.units == "layers" else {}
    for u in out:
        if u["name"] in unscored:  # the data never runs it: no drop to report, kept as important
            u.update(drop=None, drop_se=None, importance=None, unscored=unscored[u["name"]])
    scored = relative_to_max([u["importance"] for u in out if u["importance"] is not None], absolute=True)
    for u in out:
        u["importance"] = 1.0 if u["importance"] is None else scored.pop(0)
    return Scores(method="srinit", fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                  units=out, metric=metric, unit_kind=request.units,
                  seed=seed,
                  options={"seed": seed, "seeds": seeds, "samples": base["samples"], "data": request.data.record(),
                           "reference": base, "provider": provider, "passes": passes, "max_memory": max_memory,
                           **request.backend.record(),
                           "metric_note": note,
                           "init": "Kaiming normal (fan_in, ReLU gain), zero bias, fresh BatchNorm"},
                  timing={"seconds": round(seconds, 3), "units": unit_seconds})
