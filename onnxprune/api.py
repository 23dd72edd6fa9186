"""The onnxprune verbs as Python functions; the CLI only parses options and prints what these return."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune import __version__
from onnxprune.analysis.blocks import Block, find_blocks
from onnxprune.analysis.channels import channel_graph
from onnxprune.analysis.graph import analyse_graph
from onnxprune.analysis.layers import Layer, find_layers, model_params
from onnxprune.errors import InputError
from onnxprune.io import check_output_path, fingerprint, load_model, save_model
from onnxprune.plan import Plan, Scores, check_fingerprint, load_plan, load_scores
from onnxprune.runtime import data as rdata
from onnxprune.runtime.metrics import Accuracy
from onnxprune.runtime.session import create_session
from onnxprune.weights import release_weight

ModelLike = str | os.PathLike | ir.Model

# Preprocessing a model can carry in its metadata (written by models/export.py), used when no --mean/--std.
META_MEAN = "onnxprune.preprocess.mean"
META_STD = "onnxprune.preprocess.std"


@dataclass
class InspectResult:
    """Prunable layers, residual blocks and totals of a model."""

    layers: list[Layer]
    blocks: list[Block]
    params: int  # every float parameter of the model (BN statistics excluded)
    prunable_params: int  # parameters of the prunable layers (with their bias and BatchNorm)
    flops: int | None  # per sample, 2 per multiply-accumulate, prunable layers only
    fingerprint: str
    opset: int | None
    shape_error: str | None = None
    notes: list[str] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # channel dependency groups (onnxprune.analysis.channels)

    def to_dict(self) -> dict:
        return {
            "onnxprune_version": __version__,
            "fingerprint": self.fingerprint,
            "opset": self.opset,
            "layers": [layer.to_dict() for layer in self.layers],
            "blocks": [block.to_dict() for block in self.blocks],
            "groups": self.groups,
            "totals": {
                "params": self.params,
                "prunable_params": self.prunable_params,
                "flops": self.flops,
                "layers": len(self.layers),
                "blocks": len(self.blocks),
                "removable_blocks": sum(b.removable for b in self.blocks),
                "channel_groups": len(self.groups),
                "prunable_channel_groups": sum(g["prunable"] for g in self.groups),
            },
            "notes": self.notes,
        }


def _batches(m: ir.Model, sess, spec: rdata.DataSpec):
    """(batches of (feeds, labels), sample count or None, preprocessing note), checked against the model."""
    if (spec.data is None) == (spec.loader is None):
        raise InputError("give exactly one of --data FILE.npz or --data-loader-script FILE.py[:func]")
    if spec.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if spec.limit is not None and spec.limit < 1:
        raise InputError(f"--limit must be at least 1, got {spec.limit}")
    if spec.offset < 0:
        raise InputError(f"--offset must be at least 0, got {spec.offset}")
    specs = [rdata.InputSpec(i.name, i.type, list(i.shape)) for i in sess.session.get_inputs()]
    if spec.data is None:
        if spec.offset:
            raise InputError("--offset applies to --data; skip samples inside the loader script instead")
        return rdata.script_batches(rdata.load_loader_script(spec.loader), specs, spec.limit), spec.limit, None
    if len(specs) != 1:
        raise InputError(f"the model has {len(specs)} inputs; an .npz feeds one, use --data-loader-script for several")
    x, y = rdata.load_npz(spec.data, spec.input_key, spec.label_key)
    if spec.offset >= len(x):
        raise InputError(f"--offset {spec.offset} leaves no samples of the {len(x)} in {spec.data}")
    x, y = x[spec.offset:], (None if y is None else y[spec.offset:])
    rdata.check_array(x, specs[0], str(spec.data))
    mean, std, source = spec.mean, spec.std, "options"
    if mean is None and std is None:
        mean = rdata.parse_floats(m.metadata_props.get(META_MEAN), "mean")
        std = rdata.parse_floats(m.metadata_props.get(META_STD), "std")
        source = "model metadata"
    note = None
    if mean is not None or std is not None:
        note = f"x/255 if uint8, then (x - {list(mean or [0])}) / {list(std or [1])} from {source}"
    total = len(x) if spec.limit is None else min(spec.limit, len(x))
    batches = rdata.npz_batches(x, y, specs[0], rdata.Preprocess(mean, std), spec.batch_size, spec.limit)
    return batches, total, note


def _as_model(model: ModelLike) -> ir.Model:
    return model if isinstance(model, ir.Model) else load_model(model)


def inspect(model: ModelLike) -> InspectResult:
    """Find the prunable layers and residual blocks of ``model`` (a path or an onnx-ir Model).

    >>> result = inspect("build/demo/cnn.onnx")  # doctest: +SKIP
    >>> result.to_dict()["totals"]["params"]  # doctest: +SKIP
    """
    m = _as_model(model)
    return _inspect(m, fingerprint(m), groups=True)


def _inspect(m: ir.Model, model_fingerprint: str, groups: bool = False) -> InspectResult:
    """inspect() for a loaded model whose fingerprint the caller already has (hashing reads every weight);
    ``groups``: also the channel dependency groups."""
    info = analyse_graph(m)
    layers = find_layers(info)
    blocks = find_blocks(info, layers)
    flops = [layer.flops for layer in layers]
    notes = []
    if not layers:
        notes.append("no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight) found")
    if info.shape_error:
        notes.append(info.shape_error)
    if any(f is None for f in flops):
        notes.append("FLOPs unknown for layers whose output shape could not be inferred")
    symbolic = sorted({d for shape in info.shapes.values() for d in shape if isinstance(d, str)} & _input_dims(m))
    if symbolic:
        notes.append(f"symbolic input dimension(s) {', '.join(symbolic)} counted as 1 in FLOPs")
    return InspectResult(
        layers=layers,
        blocks=blocks,
        params=model_params(info),
        prunable_params=sum(layer.params for layer in layers),
        flops=None if any(f is None for f in flops) else int(sum(flops)),
        fingerprint=model_fingerprint,
        opset=m.opset_imports.get(""),
        shape_error=info.shape_error,
        notes=notes,
        groups=channel_graph(info, layers).describe() if groups else [],
    )


def _input_dims(model: ir.Model) -> set[str]:
    """Symbolic input dimensions other than the leading (batch) one."""
    dims = set()
    for v in model.graph.inputs:
        if v.shape is not None:
            dims.update(str(d.value) for d in list(v.shape)[1:] if not isinstance(d, int) and d.value is not None)
    return dims


@dataclass
class EvalResult:
    """Accuracy (percent, None without labels) and speed of a model on data."""

    top1: float | None
    top5: float | None
    samples: int
    seconds: float  # time inside ONNX Runtime
    wall_seconds: float
    provider: str
    batch_size: int
    notice: str | None = None
    preprocess: str | None = None

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "samples": self.samples,
            "seconds": round(self.seconds, 6),
            "wall_seconds": round(self.wall_seconds, 6),
            "throughput": round(self.throughput, 3),
            "provider": self.provider,
            "batch_size": self.batch_size,
            "preprocess": self.preprocess,
            "notice": self.notice,
        }


def evaluate(
    model: str | os.PathLike,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    **data_options,
) -> EvalResult:
    """Top-1 / top-5 accuracy and throughput of ``model`` with ONNX Runtime.

    ``data``: an .npz path or a DataSpec; ``data_options``: the DataSpec fields as keywords (input_key,
    label_key, mean, std, batch_size, limit, offset, provider, data_loader_script). uint8 inputs are scaled
    to [0, 1], then ``(x - mean) / std`` per channel; mean and std default to the model's
    ``onnxprune.preprocess.*`` metadata when it has some. ``progress(done, total)`` is called after each batch.
    """
    spec = rdata.DataSpec.of(data, **data_options)
    m = load_model(model)
    sess = create_session(model, spec.provider)
    batches, total, preprocess_note = _batches(m, sess, spec)
    acc = Accuracy()
    run_seconds = 0.0
    start = time.perf_counter()
    output = sess.session.get_outputs()[0].name
    for feeds, labels in batches:
        t0 = time.perf_counter()
        (logits,) = sess.run(feeds, [output])
        run_seconds += time.perf_counter() - t0
        acc.update(np.asarray(logits), labels)
        if progress:
            progress(acc.samples, total)
    if acc.samples == 0:
        raise InputError("the data has no samples; check --data / --limit")
    return EvalResult(
        top1=acc.percent(acc.top1),
        top5=acc.percent(acc.top5),
        samples=acc.samples,
        seconds=run_seconds,
        wall_seconds=time.perf_counter() - start,
        provider=sess.provider,
        batch_size=spec.batch_size,
        notice=sess.notice,
        preprocess=preprocess_note,
    )


# ---------------------------------------------------------------------------------------------------------
# score -> allocate -> apply


def _prunable_units(m: ir.Model, info=None):
    """Layers with their own weight (shared weights belong to their first user), and the FLOPs of the other
    layers that share a weight, by owner. ``info``: an analysis of ``m`` already made, if any."""
    layers = find_layers(info if info is not None else analyse_graph(m))
    owners = {layer.name: layer for layer in layers if not layer.shared_with}
    extra_flops: dict[str, int] = {}
    for layer in layers:
        if layer.shared_with:
            extra_flops[layer.shared_with] = extra_flops.get(layer.shared_with, 0) + (layer.flops or 0)
    return list(owners.values()), extra_flops


def score(
    model: ModelLike,
    method: str = "capacity",
    *,
    metric: str | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    grid: tuple[float, ...] | None = None,
    at: Plan | str | os.PathLike | None = None,
    tolerance: float = 1.0,
    units: str = "blocks",
    seed: int = 1,
    seeds: int = 1,
    max_memory: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    **data_options,
) -> Scores:
    """Per-layer importance.

    - ``capacity`` (data-free): a capacity metric of each weight tensor (onnxprune.scoring.capacity).
    Data-driven methods read ``data`` (an .npz path or a DataSpec) and the DataSpec options as keywords.

    - ``sensitivity`` (data): for each layer alone, the output drop (``metric`` kl | agreement | top1) at each
      sparsity of ``grid`` under magnitude pruning, measured with partial-graph evaluation. With ``at`` (a
      plan), each layer varies while the others stay at the plan's sparsities: curves around that operating
      point, which correct the additivity assumption at high sparsity (score, allocate, score --at, allocate).
    - ``srinit`` (data): for each residual block (``units="blocks"``) or layer (``"layers"``), the drop
      (``metric`` top1 | agreement | kl) when its weights are re-initialised (Kaiming normal, zero bias,
      fresh BatchNorm), over ``seeds`` seeds from ``seed``; activations cached up to ``max_memory`` bytes
      (default 2 GiB); see onnxprune.scoring.srinit.
    - ``compactness`` (data): for each layer alone, the highest sparsity whose top-1 drop (agreement drop
      without labels) stays within ``tolerance`` points, by bisection; importance = 1 - compactness, usable
      by ``allocate --method capacity``.
    """
    if method == "capacity":
        return _score_capacity(model, metric, progress)
    spec = rdata.DataSpec.of(data, **data_options)
    if method == "sensitivity":
        return _score_sensitivity(model, metric or "kl", spec, grid, at, progress)
    if method == "compactness":
        return _score_compactness(model, spec, tolerance, progress)
    if method == "srinit":
        return _score_srinit(model, spec, units, metric or "top1", seed, seeds, max_memory, progress)
    raise InputError(f"unknown scoring method {method!r}; available: {', '.join(SCORE_METHODS)}")


SCORE_METHODS = ("capacity", "sensitivity", "compactness", "srinit")
SENSITIVITY_METRICS = ("kl", "agreement", "top1")


def _score_capacity(model, metric, progress) -> Scores:
    from onnxprune.scoring import capacity

    metric = metric or DEFAULT_CAPACITY_METRIC
    if metric not in capacity.METRICS:
        raise InputError(f"unknown capacity metric {metric!r}; use one of {', '.join(capacity.METRICS)}")
    m = _as_model(model)
    layers, extra_flops = _prunable_units(m)
    if not layers:
        raise InputError("the model has no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    units = []
    for i, layer in enumerate(layers):
        values, how = capacity.layer_metrics(layer, [metric])
        release_weight(layer)
        units.append({**_unit_entry(layer, extra_flops), "metrics": values, **how})
        if progress:
            progress(i + 1, len(layers))
    for unit, imp in zip(units, capacity.capacity_importance([u["metrics"][metric] for u in units]), strict=True):
        unit["importance"] = imp
    return Scores(method="capacity", fingerprint=fingerprint(m), units=units, metric=metric,
                  options={"metric_definition": capacity.METRICS[metric]})


def _unit_entry(layer: Layer, extra_flops: dict[str, int]) -> dict:
    return {"name": layer.name, "op_type": layer.op_type, "weight": layer.weight,
            "weight_shape": list(layer.weight_shape), "params": int(np.prod(layer.weight_shape)),
            "flops": (layer.flops or 0) + extra_flops.get(layer.name, 0)}


def curve_drop(point: dict, base: dict, metric: str) -> float:
    """The drop a curve point records for ``metric`` (bigger = worse)."""
    if metric == "kl":
        return float(point["kl"])
    if metric == "agreement":
        return 100.0 - float(point["agreement"])
    return float(base["top1"]) - float(point["top1"])


def _calibration(model, spec: rdata.DataSpec):
    """Model, analysis, own-weight layers, flops of shared users, session provider and batches (a list)."""
    m = load_model(model) if not isinstance(model, ir.Model) else model
    info = analyse_graph(m)
    layers, extra_flops = _prunable_units(m, info)
    if not layers:
        raise InputError("the model has no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    sess = create_session(ir.serde.serialize_model(m).SerializeToString(), spec.provider)
    batches, _, _ = _batches(m, sess, spec)
    return m, info, layers, extra_flops, sess.provider, list(batches)


def _score_compactness(model, spec: rdata.DataSpec, tolerance: float, progress) -> Scores:
    from onnxprune.scoring.sensitivity import layer_compactness

    if not tolerance > 0:
        raise InputError(f"--tolerance must be positive (percentage points), got {tolerance:g}")
    m, info, layers, extra_flops, used_provider, batches = _calibration(model, spec)
    t0 = time.perf_counter()
    results, base = layer_compactness(m, info, layers, batches, tolerance, provider=used_provider, progress=progress)
    units = []
    for layer in layers:
        c = results[layer.name]["compactness"]
        units.append({**_unit_entry(layer, extra_flops), "metrics": {"compactness": c},
                      "importance": max(1.0 - c, 0.01), "criterion": results[layer.name]["criterion"]})
    samples = sum(len(next(iter(f.values()))) for f, _ in batches)
    return Scores(method="compactness", fingerprint=fingerprint(m), units=units, metric="compactness",
                  options={"tolerance": tolerance, "samples": samples, "data": spec.record(), "reference": base,
                           "provider": used_provider,
                           "definition": "highest sparsity of this layer alone whose drop stays within the "
                                         "tolerance; importance = 1 - compactness (at least 0.01)"},
                  timing={"seconds": round(time.perf_counter() - t0, 3)})


def _score_srinit(model, spec: rdata.DataSpec, units: str, metric: str, seed: int, seeds: int, max_memory: int | None,
                  progress) -> Scores:
    from onnxprune.scoring.srinit import DEFAULT_MAX_MEMORY, METRICS, srinit_scores

    if metric not in METRICS:
        raise InputError(f"unknown SR-init metric {metric!r}; use one of {', '.join(METRICS)}")
    if units not in ("blocks", "layers"):
        raise InputError(f"--units must be blocks or layers, got {units!r}")
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    max_memory = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if max_memory < 1:
        raise InputError(f"--max-memory must be positive, got {max_memory}")
    m, info, layers, extra_flops, used_provider, batches = _calibration(model, spec)
    if metric == "top1" and any(labels is None for _, labels in batches):
        raise InputError("--metric top1 needs labels in the data; use agreement or kl without labels")
    by_name = {layer.name: layer for layer in layers}
    if units == "blocks":
        blocks = find_blocks(info, find_layers(info))
        if not blocks:
            raise InputError("the model has no residual blocks; use --units layers")
        unit_defs = [(b.name, b.nodes, [by_name[n] for n in b.layers if n in by_name]) for b in blocks]
        entries = {b.name: {"name": b.name, "kind": "block", "params": b.params, "flops": b.flops, "skip": b.skip,
                            "removable": b.removable, "layers": b.layers} for b in blocks}
    else:
        unit_defs = [(layer.name, [layer.name], [layer]) for layer in layers]
        entries = {layer.name: {**_unit_entry(layer, extra_flops), "kind": "layer"} for layer in layers}
    t0 = time.perf_counter()
    results, base = srinit_scores(m, info, unit_defs, batches, list(range(seed, seed + seeds)),
                                  provider=used_provider, progress=progress, max_memory=max_memory)
    seconds = time.perf_counter() - t0
    passes = base.pop("passes")
    out = []
    unit_seconds = {}
    for name, _, _ in unit_defs:
        r = results[name]
        unit_seconds[name] = r.pop("seconds")
        extra = {"drop_seed_std": r[f"{metric}_seed_std"]} if seeds > 1 else {}
        out.append({**entries[name], "drop": r[metric], "drop_se": r[f"{metric}_se"], **extra, "metrics": r,
                    "importance": r[metric]})
    top = max((abs(u["importance"]) for u in out), default=0.0)
    for u in out:
        u["importance"] = u["importance"] / top if top > 0 else 1.0
    return Scores(method="srinit", fingerprint=fingerprint(m), units=out, metric=metric, unit_kind=units, seed=seed,
                  options={"seed": seed, "seeds": seeds, "samples": base["samples"], "data": spec.record(),
                           "reference": base, "provider": used_provider, "passes": passes, "max_memory": max_memory,
                           "init": "Kaiming normal (fan_in, ReLU gain), zero bias, fresh BatchNorm"},
                  timing={"seconds": round(seconds, 3), "units": unit_seconds})


def _score_sensitivity(model, metric: str, spec: rdata.DataSpec, grid, at, progress) -> Scores:
    from onnxprune.scoring.sensitivity import DEFAULT_GRID, layer_sensitivity

    if metric not in SENSITIVITY_METRICS:
        raise InputError(f"unknown sensitivity metric {metric!r}; use one of {', '.join(SENSITIVITY_METRICS)}")
    grid = tuple(grid or DEFAULT_GRID)
    if not all(0 <= g < 1 for g in grid):
        raise InputError(f"--grid sparsities must be in (0, 1), got {grid}")
    m, info, layers, extra_flops, used_provider, batches = _calibration(model, spec)
    if metric == "top1" and any(labels is None for _, labels in batches):
        raise InputError("--metric top1 needs labels in the data; use kl or agreement without labels")
    at_sparsities = None
    if at is not None:
        at_plan = at if isinstance(at, Plan) else load_plan(at)
        check_fingerprint(at_plan.fingerprint, fingerprint(m), "plan given to --at", False)
        at_sparsities = at_plan.sparsities()
        grid = tuple(sorted(set(grid) | {0.0}))
    t0 = time.perf_counter()
    curves, base = layer_sensitivity(m, info, layers, batches, grid, provider=used_provider, progress=progress,
                                     at=at_sparsities)
    seconds = time.perf_counter() - t0
    units = []
    for layer in layers:
        curve = curves[layer.name]
        drops = [curve_drop(p, base, metric) for p in curve[1:]]
        units.append({**_unit_entry(layer, extra_flops), "curve": curve, "mean_drop": float(np.mean(drops))})
    top = max(u["mean_drop"] for u in units)
    for u in units:
        u["importance"] = u["mean_drop"] / top if top > 0 else 1.0
    samples = sum(len(next(iter(f.values()))) for f, _ in batches)
    return Scores(method="sensitivity", fingerprint=fingerprint(m), units=units, metric=metric,
                  options={"grid": list(grid), "samples": samples, "data": spec.record(), "provider": used_provider,
                           "reference": base, "at": at_sparsities,
                           "definition": "output drop of the model with only this layer magnitude-pruned"},
                  timing={"seconds": round(seconds, 3)})


DEFAULT_CAPACITY_METRIC = "stable_rank"  # the best capacity metric of the allocation benchmark


def search_allocation(*args, **kwargs):
    from onnxprune.search import search_allocation as _search

    return _search(*args, **kwargs)


def _scores_arg(scores: Scores | str | os.PathLike | None) -> Scores | None:
    if scores is None or isinstance(scores, Scores):
        return scores
    return load_scores(scores)


def allocate(
    model: ModelLike,
    *,
    target_sparsity: float | None = None,
    method: str = "capacity",
    scores: Scores | str | os.PathLike | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    keep_dense: tuple[str, ...] | list[str] = (),
    budget: str = "params",
    force: bool = False,
    threshold: float | None = None,
    remove: int | None = None,
    target_params: float | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    iterations: int = 150,
    seed: int = 0,
    granularity: str = "unstructured",
    criterion: str = "l2",
    round_to: int = 1,
    coupled: str = "prune",
    progress: Callable[[int, int | None], None] | None = None,
    **data_options,
) -> Plan:
    """A plan: a sparsity for every prunable layer so that the budget-weighted total equals the target.

    With ``granularity="channel"`` each layer's sparsity is the fraction of its output channels to remove,
    and the target is the fraction of the model's parameters (``budget="params"``) or FLOPs (``"flops"``)
    that removing those channels takes away, counted with the channel dependency analysis (a removed channel
    also shrinks the layers that read it, so 30 % of the channels remove about half the FLOPs): the method's
    allocation is scaled by bisection until the predicted reduction meets the target; with ``round_to`` N the
    groups' channel counts are then rounded to multiples of N so that the target is still met (ONNX Runtime's
    fast CPU convolutions work on blocks of 8 channels with AVX2, 16 with AVX-512). ``coupled="keep"`` leaves
    the channels written by several layers (residual streams) whole and prunes only single-producer groups.

    ``search`` measures whole pruned models on calibration data (``data``: an .npz path or a DataSpec, and
    the DataSpec options as keywords), see onnxprune.search; every other method is computed from the weights
    and/or the scores alone.
    """
    from onnxprune import allocation

    if method not in ALLOCATION_METHODS:
        raise InputError(f"unknown allocation method {method!r}; use one of {', '.join(ALLOCATION_METHODS)}")
    if method == "srinit":
        return _allocate_blocks(model, scores, threshold, remove, target_params, force)
    if target_sparsity is None:
        raise InputError(f"--method {method} needs --target-sparsity S")
    if granularity not in ("unstructured", "channel"):
        raise InputError(f"allocate --granularity must be unstructured or channel, got {granularity!r}")
    if granularity == "channel" and method == "search":
        raise InputError("--method search measures unstructured sparsity; "
                         "use another method with --granularity channel")
    if not 0.0 <= target_sparsity < 1.0:
        raise InputError(f"--target-sparsity must be in [0, 1), got {target_sparsity:g}")
    if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
        raise InputError(f"need 0 <= --min-sparsity <= --max-sparsity < 1, got {min_sparsity:g} and {max_sparsity:g}")
    m = _as_model(model)
    fp = fingerprint(m)
    layers, extra_flops = _prunable_units(m)
    sc = _scores_arg(scores)
    if method in allocation.IMPORTANCE_METHODS and method != "search" and sc is None:
        raise InputError(f"--method {method} needs --scores scores.json (from onnxprune score)")
    importance, curves = {}, {}
    if sc is not None:
        check_fingerprint(sc.fingerprint, fp, "scores file", force)
        importance = {name: u.get("importance") for name, u in sc.by_name().items()}
        if method == "sensitivity":
            if sc.method != "sensitivity":
                raise InputError("--method sensitivity needs scores from onnxprune score --method sensitivity")
            base = sc.options.get("reference", {})
            curves = {u["name"]: [(float(p["sparsity"]), curve_drop(p, base, sc.metric or "kl")) for p in u["curve"]]
                      for u in sc.units}
    names = {layer.name for layer in layers}
    unknown = [n for n in keep_dense if n not in names]
    if unknown:
        raise InputError(f"--keep-dense names unknown layer(s) {unknown}; see onnxprune inspect for the names")
    units = [
        allocation.Unit(
            name=layer.name, n=int(np.prod(layer.weight_shape)),
            flops=(layer.flops or 0) + extra_flops.get(layer.name, 0), layer=layer,
            importance=importance.get(layer.name), lo=0.0 if layer.name in keep_dense else min_sparsity,
            hi=0.0 if layer.name in keep_dense else max_sparsity, curve=curves.get(layer.name),
        )
        for layer in layers
    ]
    search_log = None
    if method == "search":
        if sc is not None and sc.method == "sensitivity":
            base = sc.options.get("reference", {})
            for u in units:
                entry = sc.by_name().get(u.name)
                if entry is not None:
                    u.curve = [(float(p["sparsity"]), curve_drop(p, base, sc.metric or "kl")) for p in entry["curve"]]
        spec = rdata.DataSpec.of(data, **data_options)
        sess = create_session(ir.serde.serialize_model(m).SerializeToString(), spec.provider)
        batches, _, _ = _batches(m, sess, spec)
        feeds = [f for f, _ in batches]
        result, search_log = allocation.allocate_measured(
            units, target_sparsity, budget,
            lambda s_units, target, weights: search_allocation(m, s_units, target, weights, feeds,
                                                              iterations=iterations, seed=seed,
                                                              provider=sess.provider, progress=progress))
    elif granularity == "channel":
        return _allocate_channels(m, fp, units, method, target_sparsity, budget, criterion, round_to, coupled,
                                  {"min_sparsity": min_sparsity, "max_sparsity": max_sparsity,
                                   "keep_dense": list(keep_dense),
                                   **({"scores_method": sc.method, "scores_metric": sc.metric} if sc else {})})
    else:
        result = allocation.allocate(units, method, target_sparsity, budget)
    plan_layers = [
        {"name": u.name, "sparsity": result.sparsities[u.name], "granularity": "unstructured", "method": method,
         "weight": u.layer.weight, "params": u.n, "zeros": result.zeros[u.name], "flops": u.flops,
         **({"importance": u.importance} if u.importance is not None else {})}
        for u in units
    ]
    totals = {
        "target": target_sparsity, "budget": budget, "sparsity": result.total,
        "params_sparsity": result.total_params, "flops_sparsity": result.total_flops,
        "weights": sum(u.n for u in units), "zeros": sum(result.zeros.values()),
    }
    options = {"min_sparsity": min_sparsity, "max_sparsity": max_sparsity, "keep_dense": list(keep_dense),
               **({"scores_method": sc.method, "scores_metric": sc.metric} if sc else {})}
    if search_log is not None:
        options["search"] = {**search_log.__dict__, "seed": seed, "data": spec.record()}
    return Plan(method=method, fingerprint=fp, layers=plan_layers, totals=totals, budget=budget, options=options,
                seed=seed if search_log is not None else None)


CHANNEL_TOLERANCE = 0.01  # a channel plan may miss its target by this much (channels are discrete)


def _allocate_channels(m: ir.Model, fp: str, units, method: str, target: float, budget: str, criterion: str,
                       round_to: int, coupled: str, options: dict) -> Plan:
    from onnxprune import allocation
    from onnxprune.analysis.channels import channel_graph
    from onnxprune.passes.shrink import CRITERIA, choose, kept_fractions, predict, rounded_counts

    if criterion not in CRITERIA:
        raise InputError(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise InputError(f"--round-to must be at least 1, got {round_to}")
    before = _inspect(m, fp)
    info = analyse_graph(m)
    cg = channel_graph(info, find_layers(info))
    total = before.flops if budget == "flops" else before.params
    if not total:
        raise InputError(f"the model has no {budget} to remove")

    if coupled not in ("prune", "keep"):
        raise InputError(f"--coupled must be prune or keep, got {coupled!r}")
    if coupled == "keep":
        cg.keep_coupled()

    def outcome(ratios: dict[str, float], counts: dict | None = None):
        remove, choices = choose(cg, ratios, criterion, 1, counts)
        params, flops = predict(cg, remove)
        return (flops if budget == "flops" else params) / total, ratios, remove, choices, params, flops

    def achieved(t: float):
        try:
            result = allocation.allocate(units, method, t, "params") if t > 0 else None
        except InputError:  # this method cannot reach t under its bounds: too high, search lower
            return None
        return outcome(result.sparsities if result else {})

    lo, hi = 0.0, max(u.hi for u in units) if units else 0.0
    best = achieved(0.0)
    over = None  # the smallest outcome above the target (channels come in steps: the target may sit between two)
    for _ in range(40):
        mid = (lo + hi) / 2
        cur = achieved(mid)
        if cur is None:
            hi = mid
            continue
        if abs(cur[0] - target) < abs(best[0] - target):
            best = cur
        if cur[0] < target:
            lo = mid
        else:
            hi = mid
            if over is None or cur[0] < over[0]:
                over = cur
        if hi - lo < 1e-5:
            break
    if abs(best[0] - target) > CHANNEL_TOLERANCE:
        if over is None:
            blocked_groups = sum(not g["prunable"] for g in cg.groups())
            raise InputError(
                f"removing channels with {method} reaches at most {best[0]:.3f} of the {budget} of this model "
                f"(target {target:g}; {blocked_groups} channel group(s) cannot shrink, see onnxprune inspect); "
                "lower --target-sparsity or prune unstructured"
            )
        best = over  # the next whole-channel step past the target
    if round_to > 1:  # the continuous allocation, then counts rounded so that the target is still met
        ratios = best[1]
        best = outcome(ratios, rounded_counts(cg, ratios, round_to,
                                              lambda c: outcome(ratios, c)[0] >= target - 1e-9))
    frac, ratios, remove, choices, params, flops = best
    groups = cg.groups()
    blocked = [g for g in groups if not g["prunable"]]
    blocked_layers = {n for g in blocked for n in g["layers"]} - {n for g in groups if g["prunable"] for n in g["layers"]}
    ratios = {name: (0.0 if name in blocked_layers else r) for name, r in ratios.items()}
    kept = kept_fractions(cg, remove)
    plan_layers = []
    for u in units:
        elems = cg.produced.get(u.name, [])
        after = sum(cg.find(e) not in remove for e in elems)
        plan_layers.append({"name": u.name, "sparsity": (1 - after / len(elems)) if elems else 0.0,
                            "granularity": "channel", "method": method, "weight": u.layer.weight,
                            "channels": len(elems), "channels_after": after,
                            "input_kept": kept.get(u.name, (1.0, 1.0))[0], "params": u.n, "flops": u.flops,
                            "allocated_sparsity": ratios.get(u.name, 0.0)})
    totals = {"target": target, "budget": budget, "sparsity": frac,
              "params_fraction_removed": params / before.params if before.params else 0.0,
              "flops_fraction_removed": flops / before.flops if before.flops else 0.0,
              "params_before": before.params, "params_after": before.params - params,
              "flops_before": before.flops, "flops_after": before.flops - flops,
              "channels_removed": sum(c.removed for c in choices), "groups": len(choices),
              "groups_blocked": len(blocked)}
    options = {**options, "criterion": criterion, "round_to": round_to, "coupled": coupled,
               "group_removed": [{"layers": c.layers, "channels": c.channels, "removed": c.removed}
                                 for c in choices],
               "blocked": {", ".join(g["layers"][:3]) + (" ..." if len(g["layers"]) > 3 else ""): g["reason"]
                           for g in blocked}}
    return Plan(method=method, fingerprint=fp, layers=plan_layers, totals=totals, budget=budget,
                granularity="channel", options=options)


ALLOCATION_METHODS = ("capacity", "uniform", "global", "lamp", "erk", "sensitivity", "search", "srinit")


def _allocate_blocks(model, scores, threshold, remove, target_params, force) -> Plan:
    """SR-init: choose residual blocks to remove, least sensitive first.

    Candidates: removable blocks with an identity skip (SR-init never removes the first, downsampling block
    of a stage). Exactly one rule: ``threshold`` (drop <= T), ``remove`` (the K least sensitive) or
    ``target_params`` (the fewest blocks whose removal takes at least that fraction of the parameters).
    """
    if sum(x is not None for x in (threshold, remove, target_params)) != 1:
        raise InputError("--method srinit needs exactly one of --threshold T, --remove K, --target-params P")
    m = _as_model(model)
    fp = fingerprint(m)
    sc = _scores_arg(scores)
    if sc is None or sc.method != "srinit" or sc.unit_kind != "blocks":
        raise InputError("--method srinit needs --scores from onnxprune score --method srinit (--units blocks)")
    check_fingerprint(sc.fingerprint, fp, "scores file", force)
    info = _inspect(m, fp)
    blocks = {b.name: b for b in info.blocks}
    candidates = sorted(
        (u for u in sc.units if u["name"] in blocks and blocks[u["name"]].removable
         and blocks[u["name"]].skip == "identity"),
        key=lambda u: (u["drop"], u["name"]),
    )
    if remove is not None:
        if not 0 <= remove <= len(candidates):
            raise InputError(f"--remove {remove}: there are {len(candidates)} removable blocks")
        chosen = candidates[:remove]
    elif threshold is not None:
        chosen = [u for u in candidates if u["drop"] <= threshold]
    else:
        if not 0 < target_params < 1:
            raise InputError(f"--target-params must be a fraction in (0, 1), got {target_params:g}")
        chosen, removed = [], 0
        for u in candidates:
            if removed >= target_params * info.params:
                break
            chosen.append(u)
            removed += blocks[u["name"]].params
        if removed < target_params * info.params:
            raise InputError(f"removing every candidate block takes {removed / info.params:.4f} of the parameters, "
                             f"less than --target-params {target_params:g}")
    params = sum(blocks[u["name"]].params for u in chosen)
    flops = sum(blocks[u["name"]].flops or 0 for u in chosen)
    entries = [{"name": u["name"], "drop": u["drop"], "drop_se": u.get("drop_se"), "params": blocks[u["name"]].params,
                "flops": blocks[u["name"]].flops, "layers": blocks[u["name"]].layers} for u in chosen]
    totals = {"blocks_removed": len(chosen), "blocks": len(blocks), "params_removed": params,
              "params_fraction": params / info.params if info.params else 0.0, "flops_removed": flops,
              "flops_fraction": flops / info.flops if info.flops else 0.0, "params_before": info.params,
              "flops_before": info.flops}
    rule = {"threshold": threshold, "remove": remove, "target_params": target_params}
    return Plan(method="srinit", fingerprint=fp, layers=[], blocks=entries, totals=totals, granularity="blocks",
                options={"rule": {k: v for k, v in rule.items() if v is not None}, "scores_metric": sc.metric,
                         "candidates": "removable blocks with an identity skip"})


@dataclass
class ApplyResult:
    path: Path
    layers: list[dict]
    totals: dict
    input_bytes: int
    output_bytes: int
    sparse_initializers: list[str]
    skipped: dict[str, str]
    checked: str

    def to_dict(self) -> dict:
        return {"output": str(self.path), "checked": self.checked, "totals": self.totals, "input_bytes": self.input_bytes,
                "output_bytes": self.output_bytes, "sparse_initializers": len(self.sparse_initializers),
                "skipped": self.skipped, "layers": self.layers}


def _model_bytes(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def _data_path(data) -> str | os.PathLike | None:
    """The .npz path of a data argument (a path or a DataSpec), for the never-overwrite-an-input check."""
    if isinstance(data, rdata.DataSpec):
        return data.data
    return data


def check_runs(path: Path) -> None:
    """The written model passes onnx.checker (full_check) and runs one batch in ONNX Runtime.

    onnx's strict type inference does not accept sparse initializers as operator inputs (ONNX Runtime
    densifies them at load), so a model with sparse initializers gets the structural check only.
    """
    proto = onnx.load(str(path), load_external_data=False)
    full = len(proto.graph.sparse_initializer) == 0
    del proto
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except Exception as exc:
        raise RuntimeError(f"the pruned model fails onnx.checker: {exc}") from exc
    from onnxprune.runtime.timing import random_feeds

    sess = create_session(path, "cpu", prepack=False).session
    sess.run(None, random_feeds(sess))


def apply(
    model: str | os.PathLike,
    plan: Plan | str | os.PathLike,
    output: str | os.PathLike,
    *,
    granularity: str | None = None,
    nm: tuple[int, int] = (2, 4),
    store: str = "dense",
    force: bool = False,
    external_data: bool | None = None,
    check: bool = True,
    criterion: str | None = None,
    round_to: int | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    **data_options,
) -> ApplyResult:
    """Rewrite the model per the plan and write a checked model to ``output``.

    ``granularity``: ``unstructured`` (zero the smallest weights), ``n:m`` (N of every M), or ``channel``
    (remove whole output channels, each layer's planned sparsity taken as its fraction of channels; coupled
    channels go together, chosen by the ``criterion`` l1 | l2 norm of their filters; kept counts multiples of
    ``round_to``). By default the plan's granularity, criterion and rounding.

    ``data`` (channel granularity): calibration data (an .npz path or a DataSpec, DataSpec options as
    keywords); every layer that loses input channels is then refit by least squares to reproduce its original
    output (onnxprune.passes.reconstruct), which recovers much of the accuracy without training."""
    from onnxprune.passes.sparsify import SparsifyPass

    pl = plan if isinstance(plan, Plan) else load_plan(plan)
    if granularity is None:
        granularity = "channel" if pl.granularity == "channel" else "unstructured"
    if granularity not in GRANULARITIES:
        raise InputError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if store not in ("dense", "sparse"):
        raise InputError(f"unknown --store {store!r}; use dense or sparse")
    n, mm = nm
    if not 0 < n < mm:
        raise InputError(f"--nm must be N:M with 0 < N < M, got {n}:{mm}")
    check_output_path(Path(output), input_path=model, force=force)
    check_output_path(Path(output), input_path=[None if isinstance(plan, Plan) else plan, _data_path(data)],
                      forceable=False)
    m = load_model(model)
    fp = fingerprint(m)
    check_fingerprint(pl.fingerprint, fp, "plan", force)
    removed_blocks: list[str] = []
    before = None
    if pl.blocks:
        from onnxprune.passes.remove_blocks import RemoveBlocksPass

        before = _inspect(m, fp)
        by_block = {b.name: b for b in before.blocks}
        missing = [b["name"] for b in pl.blocks if b["name"] not in by_block]
        if missing:
            raise InputError(f"the plan names block(s) not in the model: {missing[:3]}; make a new plan")
        RemoveBlocksPass([by_block[b["name"]] for b in pl.blocks])(m)
        removed_blocks = [b["name"] for b in pl.blocks]
    if granularity == "channel":
        criterion = criterion or pl.options.get("criterion", "l2")
        round_to = round_to or pl.options.get("round_to", 1)
        spec = rdata.DataSpec.of(data, **data_options) if data is not None or data_options.get(
            "data_loader_script") else None
        return _apply_channels(m, fp, pl, model, output, criterion, round_to, force, external_data, check, spec,
                               progress)
    if data is not None:
        raise InputError("--data calibrates channel removal only; drop it or use --granularity channel")
    layers, _ = _prunable_units(m)
    by_name = {layer.name: layer for layer in layers}
    gone = {name for b in pl.blocks for name in b.get("layers", [])}
    planned = {name: sp for name, sp in pl.sparsities().items() if name not in gone}
    unknown = [name for name in planned if name not in by_name]
    if unknown:
        raise InputError(f"the plan names layer(s) not in the model: {unknown[:3]}; make a new plan")
    sizes = {name: int(np.prod(by_name[name].weight_shape)) for name in planned}
    targets = {name: int(round(s * sizes[name])) for name, s in planned.items()}
    sparsify = SparsifyPass([by_name[n_] for n_ in planned], targets, nm=(n, mm) if granularity == "n:m" else None)
    sparsify(m)
    rep = sparsify.report
    if granularity == "unstructured" and rep.zeros != targets:
        raise RuntimeError("zeroed weights differ from the plan's counts")
    flops = {name: by_name[name].flops or 0 for name in planned}
    total_w = sum(sizes.values()) or 0
    total_f = sum(flops.values())
    if before is not None:
        after = _inspect(m, "")  # only its counts are used: no need to hash the pruned weights
        block_totals = {"blocks_removed": len(removed_blocks), "params_before": before.params,
                        "params_after": after.params, "flops_before": before.flops, "flops_after": after.flops,
                        "params_fraction_removed": 1 - after.params / before.params if before.params else 0.0,
                        "flops_fraction_removed": (1 - after.flops / before.flops) if before.flops else 0.0}
    achieved = {
        "params_sparsity": sum(rep.zeros.values()) / total_w if total_w else 0.0,
        "flops_sparsity": (sum(flops[k] * rep.zeros[k] / sizes[k] for k in planned) / total_f) if total_f else 0.0,
        "zeros": sum(rep.zeros.values()), "weights": total_w,
        "planned_params_sparsity": pl.totals.get("params_sparsity"),
        "planned_flops_sparsity": pl.totals.get("flops_sparsity"), "granularity": granularity,
    }
    if granularity == "n:m":
        achieved["nm"] = f"{n}:{mm}"
    if before is not None:
        achieved.update(block_totals)
    weight_values = {by_name[name].weight for name in planned if rep.zeros.get(name)}
    _record_apply(m, pl, fp, {"granularity": granularity, "nm": f"{n}:{mm}" if granularity == "n:m" else None,
                              "store": store})
    saved = save_model(m, output, external_data=external_data, input_path=model, force=force,
                       sparse=weight_values if store == "sparse" else None, verify=check_runs if check else None)
    per_layer = [{"name": name, "planned_sparsity": planned[name], "sparsity": rep.zeros[name] / sizes[name],
                  "zeros": rep.zeros[name], "params": sizes[name]} for name in planned]
    return ApplyResult(path=saved.path, layers=per_layer, totals=achieved, input_bytes=_model_bytes(Path(model)),
                       output_bytes=saved.size_bytes, sparse_initializers=saved.sparse_initializers,
                       skipped=rep.skipped, checked=_check_description(check, bool(saved.sparse_initializers)))


GRANULARITIES = ("unstructured", "n:m", "channel")


def _apply_channels(m: ir.Model, fp: str, pl: Plan, model, output, criterion: str, round_to: int, force: bool,
                    external_data, check: bool, spec: rdata.DataSpec | None = None, progress=None) -> ApplyResult:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from onnxprune.analysis.channels import channel_graph
    from onnxprune.passes.shrink import CRITERIA, choose, shrink

    if criterion not in CRITERIA:
        raise InputError(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise InputError(f"--round-to must be at least 1, got {round_to}")
    if pl.blocks:
        raise InputError("a block plan removes whole blocks; apply it without --granularity channel")
    before = _inspect(m, fp)
    info = analyse_graph(m)
    layers = find_layers(info)
    by_name = {layer.name: layer for layer in layers}
    planned = pl.sparsities()
    if pl.granularity == "channel":  # reproduce the plan's choice: the ratios it gave the groups
        planned = {entry["name"]: float(entry.get("allocated_sparsity", entry["sparsity"])) for entry in pl.layers}
    unknown = [name for name in planned if name not in by_name]
    if unknown:
        raise InputError(f"the plan names layer(s) not in the model: {unknown[:3]}; make a new plan")
    cg = channel_graph(info, layers)
    if pl.options.get("coupled") == "keep":
        cg.keep_coupled()
    counts = None
    if pl.granularity == "channel" and pl.options.get("group_removed") and round_to == pl.options.get("round_to", 1):
        counts = {tuple(e["layers"]): int(e["removed"]) for e in pl.options["group_removed"]}  # the plan's counts
    remove, choices = choose(cg, planned, criterion, round_to, counts)
    refit = None
    if spec is not None:
        from onnxprune.passes.reconstruct import reconstruct

        sess = create_session(ir.serde.serialize_model(m).SerializeToString(), spec.provider)
        batches, _, _ = _batches(m, sess, spec)
        refit = reconstruct(m, cg, remove, [f for f, _ in batches], provider=sess.provider, progress=progress)
    out_before = {name: len(elems) for name, elems in cg.produced.items()}
    out_after = {name: sum(cg.find(e) not in remove for e in elems) for name, elems in cg.produced.items()}
    shrink(m, cg, remove)
    RemoveUnusedNodesPass()(m)
    after = _inspect(m, "")
    blocked = [g for g in cg.groups() if not g["prunable"] and any(planned.get(n, 0) > 0 for n in g["layers"])]
    totals = {
        "granularity": "channel", "criterion": criterion, "round_to": round_to,
        "params_before": before.params, "params_after": after.params,
        "flops_before": before.flops, "flops_after": after.flops,
        "params_fraction_removed": 1 - after.params / before.params if before.params else 0.0,
        "flops_fraction_removed": 1 - after.flops / before.flops if before.flops else 0.0,
        "channels_removed": sum(c.removed for c in choices),
        "groups": len(choices), "groups_blocked": len(blocked),
        "planned_params_sparsity": pl.totals.get("params_sparsity"),
        "planned_flops_sparsity": pl.totals.get("flops_sparsity"),
    }
    if refit is not None:
        totals["refit"] = {"layers": len(refit.refit), "samples": refit.samples, "skipped": refit.skipped,
                           "mean_error_before": float(np.mean(list(refit.error_before.values()) or [0.0])),
                           "mean_error_after": float(np.mean(list(refit.error_after.values()) or [0.0]))}
    _record_apply(m, pl, fp, {"granularity": "channel", "criterion": criterion, "round_to": round_to,
                              "refit_data": None if spec is None else spec.record()})
    saved = save_model(m, output, external_data=external_data, input_path=model, force=force,
                       verify=check_runs if check else None)
    per_layer = [{"name": name, "planned_sparsity": planned.get(name, 0.0), "channels": out_before[name],
                  "channels_after": out_after[name],
                  "sparsity": 1 - out_after[name] / out_before[name] if out_before[name] else 0.0}
                 for name in out_before]
    skipped = {", ".join(g["layers"][:3]) + (" ..." if len(g["layers"]) > 3 else ""): g["reason"] for g in blocked}
    return ApplyResult(path=saved.path, layers=per_layer, totals=totals, input_bytes=_model_bytes(Path(model)),
                       output_bytes=saved.size_bytes, sparse_initializers=[], skipped=skipped,
                       checked=_check_description(check, False))


APPLY_METADATA = "onnxprune.apply"


def _record_apply(m: ir.Model, pl: Plan, input_fp: str, options: dict) -> None:
    """What made this model, in its metadata (no time stamps: the same inputs give the same bytes)."""
    record = {"onnxprune_version": __version__, "input_fingerprint": input_fp, "options": options,
              "plan": {"method": pl.method, "seed": pl.seed, "budget": pl.budget, "granularity": pl.granularity,
                       "layers": len(pl.layers), "blocks": [b["name"] for b in pl.blocks],
                       "sha256": hashlib.sha256(json.dumps(pl.to_dict(), sort_keys=True).encode()).hexdigest()[:32]}}
    previous = m.metadata_props.get(APPLY_METADATA)
    if previous:  # pruned before: keep the history
        try:
            record["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            record["previous"] = previous
    m.metadata_props[APPLY_METADATA] = json.dumps(record, sort_keys=True)


def _check_description(check: bool, sparse: bool) -> str:
    if not check:
        return "not checked (--no-check)"
    if sparse:
        return "onnx.checker (structural: its strict type inference rejects sparse initializers), ONNX Runtime run"
    return "onnx.checker full_check, ONNX Runtime run"


# ---------------------------------------------------------------------------------------------------------
# finetune


@dataclass
class FinetuneResult:
    """What ``finetune`` did: the written model, the per-epoch history and accuracies (percent)."""

    path: Path
    history: list[dict]
    before_top1: float | None  # the input model on the eval data (torch, before calibration)
    calibrated_top1: float | None  # after BatchNorm calibration, before training
    after_top1: float | None  # the written model, measured with ONNX Runtime
    inserted_bn: int
    graph_bn: int
    teacher_matched: int
    masked_weights: int
    labels: bool
    teacher: str | None
    seconds: float
    teacher_seconds: float
    calibration_seconds: float
    options: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        d["output"] = str(self.path)
        return d


def _arrays(m: ir.Model, path, spec: rdata.DataSpec) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """All of ``spec``'s samples, preprocessed for the model's single input, and their labels."""
    sess = create_session(path, "cpu")
    if len(sess.session.get_inputs()) != 1:
        raise InputError(f"finetune trains models with one input; this one has {len(sess.session.get_inputs())}")
    batches, _, note = _batches(m, sess, spec)
    xs, ys = [], []
    for feeds, labels in batches:
        xs.append(next(iter(feeds.values())))
        ys.append(labels)
    if not xs:
        raise InputError("the data has no samples; check --data / --limit")
    x = np.concatenate(xs)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"finetune needs a float model input, this one takes {x.dtype}")
    y = None if any(v is None for v in ys) else np.concatenate(ys).astype(np.int64)
    return np.ascontiguousarray(x, np.float32), y, note


def finetune(
    model: str | os.PathLike,
    data: rdata.DataSpec | str | os.PathLike,
    output: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    labels: bool | None = None,
    eval_data: rdata.DataSpec | str | os.PathLike | None = None,
    options=None,
    force: bool = False,
    check: bool = True,
    progress: Callable[[str, int, int | None, dict], None] | None = None,
    **data_options,
) -> FinetuneResult:
    """Fine-tune (labels) and/or distil (``teacher``: the unpruned ONNX model) ``model`` on ``data`` and write
    the same graph with the trained weights to ``output``; needs torch (``pip install 'onnxprune[torch]'``).

    ``options``: a ``onnxprune.FinetuneOptions`` (epochs, lr, batch_size, augment, ...);
    ``epochs=0`` only recalibrates BatchNorm. ``labels``: use the data's labels (default: when it has them).
    ``eval_data``: held-out data (an .npz path or DataSpec) measured after every epoch and, with ONNX Runtime,
    on the written model. ``progress(phase, done, total, info)``: phase is teacher, calibrated, train or epoch.
    Graphs without BatchNormalization get one after each convolution for training, folded back on export.

    >>> from onnxprune import FinetuneOptions  # doctest: +SKIP
    >>> finetune("pruned.onnx", "train.npz", "tuned.onnx", teacher="model.onnx",
    ...          options=FinetuneOptions(epochs=10), eval_data="test.npz").after_top1  # doctest: +SKIP
    """
    try:
        import torch

        from onnxprune.recovery import finetune as ft
    except ImportError as exc:
        raise InputError(f"finetune needs torch ({exc}); install it with: pip install 'onnxprune[torch]'") from exc
    opts = options or ft.FinetuneOptions()
    opts.check()
    start, start_cpu = time.perf_counter(), time.process_time()
    spec = rdata.DataSpec.of(data, **data_options)
    check_output_path(Path(output), input_path=model, force=force)
    check_output_path(Path(output), input_path=[teacher, spec.data, _data_path(eval_data)], forceable=False)
    m = load_model(model)
    input_fp = fingerprint(m)
    _lift_float_constants(m)
    if opts.epochs == 0 and teacher is None and not any(n.op_type == "BatchNormalization" for n in m.graph):
        raise InputError(f"{model} has no BatchNormalization (folded into the convolutions), so recalibration "
                         "needs the statistics to restore: give --teacher ORIGINAL.onnx")
    x, y, _ = _arrays(m, model, spec)
    use_labels = (y is not None) if labels is None else labels
    if use_labels and y is None:
        raise InputError(f"--labels: {spec.data or spec.loader} has no labels (key {spec.label_key!r}); "
                         "give labelled data or distil with --teacher ORIGINAL.onnx --no-labels")
    if not use_labels and teacher is None:
        raise InputError("nothing to learn from: the data has no labels and no --teacher ORIGINAL.onnx is given")
    if "auto" in opts.augment:
        opts = dataclasses.replace(opts, augment=tuple(a for a in opts.augment if a != "auto")
                                   + (("flip",) if x.ndim == 4 and "flip" not in opts.augment else ()))
    if ("flip" in opts.augment or "crop" in opts.augment) and x.ndim != 4:
        raise InputError(f"--augment flip/crop needs image inputs (N, C, H, W), the model takes rank {x.ndim}; "
                         "use --augment none")
    eval_x = eval_y = espec = None
    if eval_data is not None:
        espec = rdata.DataSpec.of(eval_data)
        if espec.mean is None and espec.std is None:
            espec = rdata.DataSpec.of(espec, mean=spec.mean, std=spec.std)
        eval_x, eval_y, _ = _arrays(m, model, espec)
        if eval_y is None:
            raise InputError(f"--eval-data {espec.data}: no labels (key {espec.label_key!r}); give labelled data")
    torch.set_num_threads(opts.threads or max(1, len(os.sched_getaffinity(0))))
    module = ft.build_module(m, opts.insert_bn)
    notes = []
    t_logits = t_flipped = None
    t_stats: dict = {}
    teacher_seconds = 0.0
    if teacher is not None:
        t0 = time.perf_counter()
        tm = load_model(teacher)
        t_inputs = [v for v in tm.graph.inputs if v.name not in tm.graph.initializers]
        if len(t_inputs) != 1:
            raise InputError(f"the teacher {teacher} has {len(t_inputs)} inputs; it must take the student's input")
        names = [ins.output for ins in module.inserted]
        have = {v.name for n in tm.graph for v in n.outputs}
        t_logits, t_flipped, t_stats = ft.teacher_outputs(
            tm, x, 256, [n for n in names if n in have], opts.calibration, spec.provider, progress,
            flip="flip" in opts.augment)
        if t_logits.ndim != 2 or t_logits.shape[0] != len(x):
            raise InputError(f"the teacher's first output has shape {list(t_logits.shape)}; it must be logits "
                             f"(samples, classes)")
        teacher_seconds = time.perf_counter() - t0
    # (channels_last is faster for the convolutions of a CPU training step)
    layout = torch.channels_last if x.ndim == 4 else torch.contiguous_format
    xt = torch.from_numpy(x).contiguous(memory_format=layout)
    module = module.to(memory_format=layout)
    ext = None if eval_x is None else torch.from_numpy(eval_x).contiguous(memory_format=layout)
    opts.labels = use_labels
    rep = ft.train(module, xt, y, opts, teacher_logits=t_logits,
                   teacher_flipped=t_flipped, teacher_stats=t_stats, eval_x=ext, eval_y=eval_y,
                   progress=progress, start_time=start, start_cpu=start_cpu)
    module.write_back(m)
    m.metadata_props["onnxprune.finetune"] = json.dumps({
        "onnxprune_version": __version__, "epochs": len(rep.history), "labels": use_labels, "seed": opts.seed,
        "teacher": None if teacher is None else Path(teacher).name, "inserted_bn_folded": rep.inserted_bn,
        "input_fingerprint": input_fp, "data": spec.record(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()}},
        sort_keys=True)
    saved = save_model(m, output, input_path=model, force=force, verify=check_runs if check else None)
    after = None if espec is None else evaluate(saved.path, espec).top1
    if rep.inserted_bn:
        notes.append(f"{rep.inserted_bn} BatchNormalization layers were inserted after convolutions for training "
                     f"({rep.teacher_matched} started from the teacher's statistics) and folded back on export")
    if rep.masked_weights:
        notes.append(f"{rep.masked_weights:,} zero weights were kept at zero")
    return FinetuneResult(
        path=saved.path, history=[r.to_dict() for r in rep.history], before_top1=rep.initial_eval_top1,
        calibrated_top1=rep.calibrated_eval_top1, after_top1=after, inserted_bn=rep.inserted_bn,
        graph_bn=rep.graph_bn, teacher_matched=rep.teacher_matched, masked_weights=rep.masked_weights,
        labels=use_labels, teacher=None if teacher is None else str(teacher),
        seconds=time.perf_counter() - start, teacher_seconds=teacher_seconds,
        calibration_seconds=rep.calibration_seconds, options=dict(opts.__dict__), notes=notes + rep.notes)


def _lift_float_constants(m: ir.Model) -> None:
    """Weights held in Constant nodes (older exporters) become initializers, so they train."""
    if any(n.op_type == "Constant" and "value" in n.attributes
           and n.attributes["value"].value.dtype.is_floating_point() and n.attributes["value"].value.size > 1
           for n in m.graph):
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        LiftConstantsToInitializersPass(size_limit=2)(m)


# ---------------------------------------------------------------------------------------------------------
# the choices every front end offers (the CLI reads its option choices from here)

from onnxprune.plan import load_plan, load_scores, write_json  # noqa: E402
from onnxprune.runtime.data import DataSpec, parse_floats, parse_size  # noqa: E402
from onnxprune.runtime.session import PROVIDERS  # noqa: E402
from onnxprune.scoring.capacity import METRICS as _CAPACITY_METRICS  # noqa: E402

CAPACITY_METRICS = tuple(_CAPACITY_METRICS)
SRINIT_METRICS = ("top1", "agreement", "kl")
SRINIT_UNITS = ("blocks", "layers")
ALLOCATION_GRANULARITIES = ("unstructured", "channel")
BUDGETS = ("params", "flops")
CRITERIA = ("l1", "l2")
COUPLED = ("prune", "keep")
STORES = ("dense", "sparse")
