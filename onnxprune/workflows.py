"""The one-command flows on top of the verbs: ``prune`` (score, allocate, apply, measure) and ``sweep``
(accuracy against sparsity for several allocation methods)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.artefacts import Scores, Sweep, write_json
from onnxprune.errors import InputError
from onnxprune.io import check_output_path, model_file_bytes
from onnxprune.planning.registry import LAYER_METHODS
from onnxprune.runtime import data as rdata
from onnxprune.runtime.backend import Backend
from onnxprune.runtime.input_values import parse_input_values
from onnxprune.verbs.allocate import allocate
from onnxprune.verbs.apply import WEIGHT_CRITERIA, ApplyResult, apply
from onnxprune.verbs.evaluate import evaluate
from onnxprune.verbs.loading import InputShapesLike, data_path, open_model
from onnxprune.verbs.score import score

__all__ = ["ModelStats", "PruneResult", "artefact_paths", "prune", "sweep"]


@dataclass
class ModelStats:
    """What ``prune`` compares before and after: size, cost, speed and (with labelled data) accuracy."""

    params: int
    flops: int | None
    file_bytes: int
    latency_ms: float | None = None  # median per batch-1 run with ONNX Runtime
    top1: float | None = None  # percent
    top5: float | None = None
    output_error: float | None = None  # percent against the dense model, without labels (runtime.metrics)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PruneResult:
    """What ``prune`` wrote and measured."""

    path: Path
    scores_path: Path | None
    plan_path: Path
    before: ModelStats
    after: ModelStats
    mode: str  # unstructured | channel | blocks
    method: str
    applied: ApplyResult
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"output": str(self.path), "scores": None if self.scores_path is None else str(self.scores_path),
                "plan": str(self.plan_path), "mode": self.mode, "method": self.method,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "totals": self.applied.totals, "checked": self.applied.checked, "notes": self.notes}


def artefact_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``prune`` writes its intermediate files: OUT.scores.json and OUT.plan.json beside OUT.onnx."""
    out = Path(output)
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".scores.json"), out.with_name(stem + ".plan.json")


def prune(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target_sparsity: float | None = None,
    target_flops: float | None = None,
    remove_blocks: int | None = None,
    method: str | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    eval_data: rdata.DataSpec | str | os.PathLike | None = None,
    round_to: int | str = "auto",
    seed: int = 1,
    criterion: str = "magnitude",
    damp: float | None = None,
    block_size: int | None = None,
    backend: Backend | None = None,
    latency: bool = True,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    input_shapes: InputShapesLike = None,
    input_values=None,
    **data_options,
) -> PruneResult:
    """Score, allocate and apply in one call, writing OUT.scores.json and OUT.plan.json beside ``output``,
    then measure the model before and after (parameters, FLOPs, file size, batch-1 latency, and top-1/top-5
    when ``data`` has labels).

    Exactly one goal:

    - ``target_sparsity=S``: zero a fraction S of the weights (unstructured), allocated by ``method``
      (default ``lamp``; ``capacity`` uses capacity scores, ``sensitivity`` and ``search`` need ``data``),
      chosen inside each layer by ``criterion`` (``magnitude``; ``wanda`` and ``obs`` need ``data``; obs's
      ``damp`` and ``block_size`` as in onnxprune.api.apply);
    - ``target_flops=F``: remove whole channels until a fraction F of the FLOPs is gone (``method`` default
      ``uniform``); with ``data`` the layers that lose inputs are refit (no training);
    - ``remove_blocks=K``: remove the K residual blocks whose SR-init re-initialisation hurts least
      (needs ``data``; ``seed`` seeds the re-initialisation).

    ``backend``: where the SR-init and sensitivity runs go (onnxprune.runtime.backend; the same numbers).

    ``eval_data`` (an .npz path or DataSpec, fed like ``data``): where accuracy is measured before and after;
    without it, on ``data`` itself (then the pruned model has seen that data through scoring or the refit).
    ``input_values``: auxiliary inputs for the output check and timing (``["sr=16000"]``; default: the data's).

    >>> res = prune("model.onnx", "pruned.onnx", target_sparsity=0.7)  # doctest: +SKIP
    >>> res.after.params, res.before.params  # doctest: +SKIP
    """
    backend = backend or Backend()
    backend.check()
    goals = [g for g in (target_sparsity, target_flops, remove_blocks) if g is not None]
    if len(goals) != 1:
        raise InputError("give exactly one goal: --target-sparsity S, --target-flops F or --remove-blocks K")
    if criterion != "magnitude" and target_sparsity is None:
        raise InputError(f"--criterion {criterion} chooses weights inside layers: it goes with --target-sparsity")
    if criterion != "magnitude" and data is None and not data_options.get("data_loader_script"):
        raise InputError(f"--criterion {criterion} chooses weights from the layers' real inputs: give --data")
    say = progress or (lambda _: None)
    spec = rdata.DataSpec.of(data, **data_options) if data is not None or data_options.get("data_loader_script") \
        else None
    values = parse_input_values(input_values) or (spec.input_values if spec is not None else None)
    out = Path(output)
    scores_path, plan_path = artefact_paths(out)
    for p in (out, scores_path, plan_path):
        check_output_path(p, input_path=model, force=force)
    check_output_path(out, input_path=[data_path(spec), data_path(eval_data)], forceable=False)
    am = open_model(model, input_shapes=input_shapes, data=spec)
    if target_flops is not None:
        am.require_input_sizes("FLOPs")
    if latency:
        am.require_input_sizes("Latency (turn it off with --no-latency)")
    espec = _fed_like(eval_data, spec)
    before_acc = None
    if espec is not None:  # first: bad evaluation data fails before any work or any file
        say("evaluating")
        before_acc = evaluate(model, espec)
    if remove_blocks is not None:
        mode, method = "blocks", method or "srinit"
        if method != "srinit":
            raise InputError("--remove-blocks chooses blocks by SR-init; drop --method or use --method srinit")
        if spec is None:
            raise InputError("--remove-blocks needs --data: SR-init measures each block on real inputs")
        if not am.blocks:
            raise InputError("the model has no residual blocks to remove; prune channels (--target-flops) or "
                             "weights (--target-sparsity) instead")
        say("scoring blocks (SR-init)")
        scores = score(am, "srinit", data=spec, seed=seed, backend=backend)  # the metric suits outputs and labels
        say("allocating")
        plan = allocate(am, method="srinit", scores=scores, remove=remove_blocks)
    else:
        mode = "unstructured" if target_sparsity is not None else "channel"
        method = method or ("lamp" if mode == "unstructured" else "uniform")
        if method not in LAYER_METHODS:
            raise InputError(f"unknown --method {method!r} for this goal; use one of {', '.join(LAYER_METHODS)}")
        if method in ("sensitivity", "search") and spec is None:
            raise InputError(f"--method {method} measures the model: give --data")
        say("scoring layers")
        scores = (score(am, "sensitivity", data=spec, backend=backend) if method == "sensitivity"
                  else score(am, "capacity"))
        say("allocating")
        plan = allocate(am, method=method, scores=scores, data=spec if method == "search" else None,
                        target_sparsity=target_sparsity if mode == "unstructured" else target_flops,
                        budget="params" if mode == "unstructured" else "flops",
                        granularity=mode, round_to=round_to, seed=seed)
    say("applying")
    calibrate = spec if mode == "channel" or criterion != "magnitude" else None  # the refit, wanda / obs
    before = _stats(model, am)
    am_shapes = am.input_shapes
    applied = apply(am, plan, out, force=force, data=calibrate, input_values=values,  # rewrites am's model
                    criterion=criterion if mode == "unstructured" else None, damp=damp, block_size=block_size)
    try:
        write_json(scores.to_dict(), scores_path)
        write_json(plan.to_dict(), plan_path)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    after = _stats(out, input_shapes=am_shapes)
    if latency:
        say("timing")
        from onnxprune.runtime.timing import latency as measure

        before.latency_ms, after.latency_ms = measure([model, out], spec.provider if spec else "cpu",
                                                      shapes=am_shapes, values=values)
    notes = []
    if espec is not None:
        say("evaluating")
        res = evaluate(out, espec, reference=None if before_acc.top1 is not None else model)
        before.top1, before.top5 = before_acc.top1, before_acc.top5
        after.top1, after.top5 = res.top1, res.top5
        if before.top1 is None:
            before.output_error, after.output_error = 0.0, res.output_error
            notes.append("the data has no labels: the outputs are compared with the dense model's instead "
                         "(output error)")
        elif eval_data is None and (mode != "unstructured" or method in ("sensitivity", "search")
                                    or criterion != "magnitude"):
            notes.append("accuracy measured on --data, which the pruning also used; give --eval-data held-out "
                         "data for an unbiased number")
    return PruneResult(path=applied.path, scores_path=scores_path, plan_path=plan_path, before=before, after=after,
                       mode=mode, method=method, applied=applied, notes=notes)


def _sweep_cell(shared: dict, cell: tuple[str, float]) -> list[dict]:
    """One (method, target) of a sweep: allocated once, applied with each criterion, each result measured
    (a task of Backend.map: here with the driver's AnalysedModel, on a worker with one loaded from the path)."""
    method, target = cell
    model, spec, calib = shared["model"], shared["spec"], shared["calib"]
    am = shared["am"] or open_model(model, input_shapes=shared["input_shapes"], data=spec)
    try:
        plan, failed = allocate(am, method=method, target_sparsity=target, scores=shared["scores"].get(method),
                                budget=shared["budget"], granularity=shared["granularity"], seed=shared["seed"],
                                data=spec if method == "search" else None), None
    except InputError as exc:  # e.g. a target this method cannot reach on this model
        plan, failed = None, str(exc)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="onnxprune-sweep-"))
    try:
        for criterion in shared["criteria"]:
            row = {"method": method if criterion == "magnitude" else f"{method}+{criterion}", "sparsity": target,
                   **({"criterion": criterion} if criterion != "magnitude" else {})}
            try:
                if failed:
                    raise InputError(failed)
                applied = apply(model, plan, tmp / "pruned.onnx", check=False, force=True,
                                criterion=criterion if shared["granularity"] == "unstructured" else None,
                                data=calib if criterion != "magnitude" else None)
                res = evaluate(applied.path, spec, reference=None if shared["labelled"] else model)
                t = applied.totals
                row.update(top1=res.top1, top5=res.top5, output_error=res.output_error,
                           params_removed=t.get("params_sparsity", t.get("params_fraction_removed")),
                           flops_removed=t.get("flops_sparsity", t.get("flops_fraction_removed")))
            except InputError as exc:
                row["error"] = str(exc)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _fed_like(eval_data, spec: rdata.DataSpec | None) -> rdata.DataSpec | None:
    """``eval_data`` (a path: fed with ``spec``'s keys, normalisation and batch size; a DataSpec as it is), or
    ``spec`` when it is None."""
    if eval_data is None:
        return spec
    if isinstance(eval_data, rdata.DataSpec):
        return eval_data
    base = spec or rdata.DataSpec()  # the same feeding options as --data (keys, mean/std, batch size)
    return rdata.DataSpec(data=eval_data, input_key=base.input_key, label_key=base.label_key, mean=base.mean,
                          std=base.std, batch_size=base.batch_size, provider=base.provider)


def _stats(path: str | os.PathLike, am=None, input_shapes=None) -> ModelStats:
    am = am if am is not None else open_model(path, check=False, input_shapes=input_shapes)
    return ModelStats(params=am.params, flops=am.flops, file_bytes=model_file_bytes(path))


# ---------------------------------------------------------------------------------------------------------
# sweep


def sweep(
    model: str | os.PathLike,
    data: rdata.DataSpec | str | os.PathLike,
    *,
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9),
    methods: tuple[str, ...] = ("capacity", "uniform", "lamp"),
    granularity: str = "unstructured",
    budget: str = "params",
    seed: int = 0,
    criteria: tuple[str, ...] = ("magnitude",),
    calibration: rdata.DataSpec | str | os.PathLike | None = None,
    backend: Backend | None = None,
    progress: Callable[[int, int], None] | None = None,
    input_shapes: InputShapesLike = None,
    **data_options,
) -> Sweep:
    """Prune ``model`` with each method at each sparsity (one-shot, no recovery) and measure top-1 on
    ``data`` (without labels: the output error against ``model``, onnxprune.runtime.metrics.output_error):
    the table behind the accuracy-against-sparsity plot of ``onnxprune report``.
    ``granularity`` unstructured (sparsity = fraction of weights) or channel (fraction of the ``budget``).
    Unstructured: each allocation with each of ``criteria`` (magnitude, wanda, obs; a row's ``method`` is then
    ``lamp+obs``); wanda and obs choose weights from ``calibration`` data (an .npz path or DataSpec), which
    should not overlap ``data``. ``backend`` ray: each (method, target) cell a Ray task (on workers that see
    the model's and the data's paths), the rows in the local order."""
    backend = backend or Backend()
    backend.check()
    spec = rdata.DataSpec.of(data, **data_options)
    unknown = [c for c in criteria if c not in WEIGHT_CRITERIA]
    if unknown or not criteria:
        raise InputError(f"unknown criteria {unknown or criteria}; use some of {', '.join(WEIGHT_CRITERIA)}")
    if set(criteria) != {"magnitude"} and granularity != "unstructured":
        raise InputError("--criteria chooses weights inside layers: it goes with --granularity unstructured")
    calib = None
    if set(criteria) - {"magnitude"}:
        if calibration is None:
            raise InputError(f"--criteria {','.join(criteria)}: wanda and obs choose weights from the layers' real "
                             "inputs; give --calibration-data (samples not in --data)")
        calib = _fed_like(calibration, spec)  # fed like data
    if not sparsities or not all(0 <= s < 1 for s in sparsities):
        raise InputError(f"--sparsities must be numbers in [0, 1), got {list(sparsities)}")
    unknown = [x for x in methods if x not in LAYER_METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {unknown or methods}; use some of {', '.join(LAYER_METHODS)}")
    if granularity not in ("unstructured", "channel"):
        raise InputError(f"--granularity must be unstructured or channel, got {granularity!r}")
    am = open_model(model, input_shapes=input_shapes, data=spec)
    if budget == "flops":
        am.require_input_sizes("FLOPs")
    dense = evaluate(model, spec)
    labelled = dense.top1 is not None  # else each pruned model's output error against the dense one
    scores: dict[str, Scores] = {}
    if "capacity" in methods:
        scores["capacity"] = score(am, "capacity")
    if "sensitivity" in methods:
        scores["sensitivity"] = score(am, "sensitivity", data=spec, backend=backend)
    shared = {"model": model, "am": am if backend.kind == "local" else None, "input_shapes": dict(am.input_shapes),
              "scores": scores, "budget": budget, "granularity": granularity, "seed": seed, "spec": spec,
              "calib": calib, "criteria": list(criteria), "labelled": labelled}
    found = backend.map(_sweep_cell, [(m, s) for m in methods for s in sparsities], shared, progress)
    rows = [row for cell in found for row in cell]
    return Sweep(fingerprint=am.fingerprint, granularity=granularity, budget=budget, data=spec.record(),
                 dense={"top1": dense.top1, "top5": dense.top5, "output_error": None if labelled else 0.0,
                        "samples": dense.samples}, rows=rows,
                 options={"sparsities": list(sparsities), "methods": list(methods), "seed": seed,
                          "metric": "top1" if labelled else "output_error", "criteria": list(criteria),
                          **backend.record(),
                          **({"calibration": calib.record()} if calib is not None else {})})
