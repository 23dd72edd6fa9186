"""``apply``: rewrite a model by a plan with onnx-ir passes and write a checked model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune._version import __version__
from onnxprune.analysis.input_shapes import describe_unknown
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan, check_fingerprint, load_plan
from onnxprune.errors import InputError
from onnxprune.io import check_output_path, model_file_bytes, save_model
from onnxprune.io.checking import OnnxCheckError, check_file
from onnxprune.io.model_folder import FolderResult, check_folder, write_folder
from onnxprune.passes import (
    ProvenancePass,
    RefitPass,
    RemoveBlocksPass,
    ShrinkChannelsPass,
    SparsifyPass,
    run_passes,
)
from onnxprune.passes.data_aware import CALIBRATION_SAMPLES, DataAwareSparsifyPass
from onnxprune.passes.data_aware import CRITERIA as DATA_CRITERIA
from onnxprune.planning.channel_selection import CRITERIA, choose
from onnxprune.planning.channels import describe_blocked
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import calibration_batches
from onnxprune.runtime.input_values import parse_input_values
from onnxprune.runtime.language_model import decoder_of
from onnxprune.runtime.session import create_session
from onnxprune.runtime.timing import random_feeds
from onnxprune.verbs.inspect import summarise
from onnxprune.verbs.loading import InputShapesLike, data_path, open_model

__all__ = ["APPLY_CRITERIA", "APPLY_METADATA", "ApplyResult", "GRANULARITIES", "WEIGHT_CRITERIA", "apply",
           "check_runs"]

GRANULARITIES = ("unstructured", "n:m", "channel")
WEIGHT_CRITERIA = ("magnitude",) + DATA_CRITERIA  # how unstructured / N:M weights are chosen
APPLY_CRITERIA = CRITERIA + WEIGHT_CRITERIA  # channel criteria (l1, l2) and weight criteria
APPLY_METADATA = "onnxprune.apply"


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
    folder: FolderResult | None = None  # a runtime's model folder written beside it (GenAI, Optimum)

    def to_dict(self) -> dict:
        return {"output": str(self.path), "checked": self.checked, "totals": self.totals, "input_bytes": self.input_bytes,
                "output_bytes": self.output_bytes, "sparse_initializers": len(self.sparse_initializers),
                "skipped": self.skipped, "layers": self.layers,
                "folder": None if self.folder is None else self.folder.to_dict()}


def check_runs(path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None,
               original: Path | None = None, unknown: str | None = None,
               input_values: dict[str, tuple[float, ...]] | None = None) -> None:
    """The written model passes onnx.checker (full_check) and runs one batch in ONNX Runtime, at
    ``input_shapes`` (1 for a dimension they leave dynamic), auxiliary inputs at ``input_values`` (else zeros
    for integer inputs). When it does not run and neither does the
    ``original`` model at the same inputs, the sizes were made up: an InputError asks for ``unknown`` (what
    to give, see onnxprune.analysis.input_shapes.describe_unknown).

    onnx's strict type inference does not accept sparse initializers as operator inputs (ONNX Runtime
    densifies them at load), so a model with sparse initializers gets the structural check only.
    """
    proto = onnx.load(str(path), load_external_data=False)
    full = len(proto.graph.sparse_initializer) == 0
    decoder = decoder_of(ir.serde.deserialize_model(proto))  # reads names and shapes only, no weights
    del proto
    try:
        check_file(path, full_check=full)
    except OnnxCheckError as exc:
        raise RuntimeError(f"the pruned model fails onnx.checker: {exc}") from exc
    sess = create_session(path, "cpu", prepack=False).session
    feeds = random_feeds(sess, shapes=input_shapes, values=input_values, decoder=decoder)
    try:
        sess.run(None, feeds)
    except Exception:
        if unknown and original is not None and not _runs(original, feeds):
            raise InputError(f"the output check needs the size of {unknown}: the model does not run at the "
                             f"size 1 the check would otherwise use") from None
        raise


def _runs(path: Path, feeds: dict) -> bool:
    try:
        create_session(path, "cpu", prepack=False).session.run(None, feeds)
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def apply(
    model: str | os.PathLike | AnalysedModel,
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
    input_shapes: InputShapesLike = None,
    input_values=None,
    damp: float | None = None,
    block_size: int | None = None,
    **data_options,
) -> ApplyResult:
    """Rewrite the model per the plan and write a checked model to ``output``.

    ``granularity``: ``unstructured`` (zero the smallest weights) or ``n:m`` (N of every M) for a plan of
    weight sparsities; ``channel`` (remove whole output channels; coupled channels go together, chosen by the
    ``criterion`` l1 | l2 norm of their filters; kept counts multiples of ``round_to``) for a channel plan.
    By default the plan's granularity, criterion and rounding; a granularity the plan was not made for is
    refused.

    ``data`` (channel granularity): calibration data (an .npz path or a DataSpec, DataSpec options as
    keywords); every layer that loses input channels is then refit by least squares to reproduce its original
    output (onnxprune.passes.reconstruct), which recovers much of the accuracy without training. For
    unstructured / N:M weights, ``criterion`` ``wanda`` or ``obs`` (onnxprune.passes.data_aware) chooses the
    zeros from the layers' inputs on ``data`` (obs also updates the survivors); ``magnitude`` (default) needs
    no data; they read the first CALIBRATION_SAMPLES samples of ``data`` unless ``limit`` says. obs's ``damp`` (added to the Hessian's diagonal, times its mean; default 0.01) and ``block_size``
    (inputs pruned together; default 128) were chosen on ResNet-56 (BENCHMARKS.md, data-aware).

    The written model is checked at ``input_shapes`` (see onnxprune.api.inspect), else at the sizes the plan
    was made at, else at those the data fixes, with its auxiliary inputs at ``input_values`` (``["sr=16000"]``
    or name -> numbers; default: a DataSpec's); it keeps its dynamic dimensions.

    ``model``: a path, or an AnalysedModel loaded from one (its model is rewritten: do not use it after)."""
    pl = plan if isinstance(plan, Plan) else load_plan(plan)
    if granularity is None:
        granularity = "channel" if pl.granularity == "channel" else "unstructured"
    if granularity not in GRANULARITIES:
        raise InputError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    _check_granularity(pl, granularity)
    if store not in ("dense", "sparse"):
        raise InputError(f"unknown --store {store!r}; use dense or sparse")
    n, mm = nm
    if not 0 < n < mm:
        raise InputError(f"--nm must be N:M with 0 < N < M, got {n}:{mm}")
    model_path = model.path if isinstance(model, AnalysedModel) else Path(model)
    check_output_path(Path(output), input_path=model_path, force=force)
    check_output_path(Path(output), input_path=[None if isinstance(plan, Plan) else plan, data_path(data)],
                      forceable=False)
    spec = rdata.DataSpec.of(data, **data_options) if data is not None or data_options.get(
        "data_loader_script") else None
    if granularity != "channel":
        criterion = criterion or "magnitude"
        if criterion not in WEIGHT_CRITERIA:
            raise InputError(f"--criterion {criterion} ranks channels; for {granularity} weights use one of "
                             f"{', '.join(WEIGHT_CRITERIA)}")
        if criterion != "magnitude" and spec is None:
            raise InputError(f"--criterion {criterion} chooses weights from the layers' real inputs: give "
                             "--data (a few hundred calibration samples)")
        if criterion == "magnitude" and spec is not None:
            raise InputError("--data calibrates channel removal and the wanda / obs criteria; drop it, or give "
                             "--criterion wanda or obs")
        if criterion != "magnitude" and spec.limit is None:  # every sample of a big file would not fit
            spec = dataclasses.replace(spec, limit=CALIBRATION_SAMPLES)
    obs_options = _obs_options(criterion if granularity != "channel" else None, damp, block_size)
    am = open_model(model, input_shapes=input_shapes or pl.input_shapes, data=spec)
    check_fingerprint(pl.fingerprint, am.fingerprint, "plan", force)
    unknown = describe_unknown(am.unknown_dims, am.model) if am.unknown_dims else None
    values = parse_input_values(input_values) or (spec.input_values if spec is not None else None)
    target = _Target(Path(output), model_path, force, external_data, check, am.input_shapes, unknown, values)
    if granularity == "channel":
        criterion = criterion or pl.options.get("criterion", "l2")
        round_to = round_to or pl.options.get("round_to", 1)
        return _apply_channels(am, pl, target, criterion, round_to, spec, progress)
    return _apply_sparsity(am, pl, target, granularity, (n, mm), store, criterion, spec, progress, obs_options)


def _obs_options(criterion: str | None, damp: float | None, block_size: int | None) -> dict:
    """DataAwareSparsifyPass's keywords for obs; refused for anything else (an option that does nothing)."""
    given = {k: v for k, v in (("damp", damp), ("block", block_size)) if v is not None}
    if given and criterion != "obs":
        raise InputError("--damp and --block-size tune --criterion obs; drop them or give --criterion obs")
    if damp is not None and not (0 < damp < float("inf")):
        raise InputError(f"--damp must be a positive number (0.01 is the default), got {damp}")
    if block_size is not None and block_size < 1:
        raise InputError(f"--block-size must be a positive whole number (128 is the default), got {block_size}")
    return given


def _check_granularity(pl: Plan, granularity: str) -> None:
    """A plan is applied as what it plans: channel ratios are not weight sparsities, nor the reverse."""
    if pl.granularity == "channel" and granularity != "channel":
        raise InputError(f"the plan removes whole channels; --granularity {granularity} needs a plan of weight "
                         f"sparsities (onnxprune allocate without --granularity channel), or drop --granularity")
    if pl.granularity == "unstructured" and granularity == "channel":
        raise InputError("the plan gives weight sparsities, not channels to remove; make a channel plan "
                         "(onnxprune allocate --granularity channel) or drop --granularity channel")


@dataclass
class _Target:
    """Where and how the rewritten model is written."""

    output: Path
    input_path: Path
    force: bool
    external_data: bool | None
    check: bool
    input_shapes: dict[str, tuple[int, ...]]
    unknown: str | None  # the input dimensions the output check has no size for (describe_unknown)
    input_values: dict[str, tuple[float, ...]] | None = None  # auxiliary inputs (--input-value)

    folder: FolderResult | None = None  # the runtime's folder files written beside the model (io.model_folder)

    def save(self, am: AnalysedModel, sparse: set[str] | None = None):
        check_folder(am.model, self.input_path)
        saved = save_model(am.model, self.output, external_data=self.external_data, input_path=self.input_path,
                           force=self.force, sparse=sparse, verify=self._verify if self.check else None)
        decoder = decoder_of(am.model)
        self.folder = write_folder(am.model, self.input_path, saved.path, decoder.layers if decoder else None)
        return saved

    def _verify(self, path: Path) -> None:
        check_runs(path, self.input_shapes, self.input_path, self.unknown, self.input_values)

    def checked(self, sparse: bool) -> str:
        if not self.check:
            return "not checked (--no-check)"
        if sparse:
            return "onnx.checker (structural: its strict type inference rejects sparse initializers), ONNX Runtime run"
        return "onnx.checker full_check, ONNX Runtime run"


def _apply_sparsity(am: AnalysedModel, pl: Plan, target: _Target, granularity: str, nm: tuple[int, int],
                    store: str, criterion: str = "magnitude", spec: rdata.DataSpec | None = None,
                    progress=None, obs_options: dict | None = None) -> ApplyResult:
    """Unstructured or N:M zeros per layer, after removing the plan's blocks (if any), chosen by magnitude
    or, on ``spec``'s data, by wanda / obs (onnxprune.passes.data_aware; ``obs_options``: damp, block)."""
    input_fingerprint = am.fingerprint
    before = None
    if pl.blocks:
        before = summarise(am)
        by_block = {b.name: b for b in before.blocks}
        missing = [b["name"] for b in pl.blocks if b["name"] not in by_block]
        if missing:
            raise InputError(f"the plan names block(s) not in the model: {missing[:3]}; make a new plan")
        run_passes(am.model, [RemoveBlocksPass([by_block[b["name"]] for b in pl.blocks])])
        am = am.after_rewrite()
    by_name = {layer.name: layer for layer in am.owned_layers}
    gone = {name for b in pl.blocks for name in b.get("layers", [])}
    planned = {name: sp for name, sp in pl.sparsities().items() if name not in gone}
    unknown = [name for name in planned if name not in by_name]
    if unknown:
        raise InputError(f"the plan names layer(s) not in the model: {unknown[:3]}; make a new plan")
    sizes = {name: int(np.prod(by_name[name].weight_shape)) for name in planned}
    targets = {name: int(round(s * sizes[name])) for name, s in planned.items()}
    n, mm = nm
    chosen = [by_name[name] for name in planned]
    pattern = nm if granularity == "n:m" else None
    options = {"granularity": granularity, "nm": f"{n}:{mm}" if granularity == "n:m" else None, "store": store,
               "criterion": criterion}
    if criterion == "magnitude":
        sparsify = SparsifyPass(chosen, targets, nm=pattern)
    else:
        provider, batches = calibration_batches(am.model, spec)
        sparsify = DataAwareSparsifyPass(chosen, targets, criterion, [f for f, _ in batches], nm=pattern,
                                         provider=provider, progress=progress, **(obs_options or {}))
        options["calibration"] = spec.record()
        if criterion == "obs":
            options.update(damp=sparsify.damp, block_size=sparsify.block)
    run_passes(am.model, [sparsify, _provenance(pl, input_fingerprint, options)])
    rep = sparsify.report
    fallback = getattr(sparsify, "fallback", {})  # layers wanda / obs could not view: pruned by magnitude
    flops = {name: by_name[name].flops or 0 for name in planned}
    total_w = sum(sizes.values()) or 0
    total_f = sum(flops.values())
    achieved = {
        "params_sparsity": sum(rep.zeros.values()) / total_w if total_w else 0.0,
        "flops_sparsity": None if am.unknown_dims else
        (sum(flops[k] * rep.zeros[k] / sizes[k] for k in planned) / total_f) if total_f else 0.0,
        "zeros": sum(rep.zeros.values()), "weights": total_w,
        "planned_params_sparsity": pl.totals.get("params_sparsity"),
        "planned_flops_sparsity": pl.totals.get("flops_sparsity"), "granularity": granularity,
        "criterion": criterion,
    }
    if fallback:
        achieved["magnitude_fallback"] = fallback
    if granularity == "n:m":
        achieved["nm"] = f"{n}:{mm}"
    if before is not None:
        after = summarise(am, fingerprint=False)
        achieved.update({"blocks_removed": len(pl.blocks), **_size_change(before, after)})
    weight_values = {by_name[name].weight for name in planned if rep.zeros.get(name)}
    saved = target.save(am, sparse=weight_values if store == "sparse" else None)
    output_error = getattr(sparsify, "error", {})  # obs: each layer's relative output error on the data
    per_layer = [{"name": name, "planned_sparsity": planned[name], "sparsity": rep.zeros[name] / sizes[name],
                  "zeros": rep.zeros[name], "params": sizes[name],
                  **({"output_error": output_error[name]} if name in output_error else {})} for name in planned]
    return ApplyResult(path=saved.path, layers=per_layer, totals=achieved,
                       input_bytes=model_file_bytes(target.input_path), output_bytes=saved.size_bytes,
                       sparse_initializers=saved.sparse_initializers, skipped=rep.skipped,
                       checked=target.checked(bool(saved.sparse_initializers)), folder=target.folder)


def _apply_channels(am: AnalysedModel, pl: Plan, target: _Target, criterion: str, round_to: int,
                    spec: rdata.DataSpec | None, progress) -> ApplyResult:
    """Whole channels removed (the consumers refit on ``spec``'s data first, when given)."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise InputError(f"--round-to must be at least 1, got {round_to}")
    if pl.blocks:
        raise InputError("a block plan removes whole blocks; apply it without --granularity channel")
    before = summarise(am)
    by_name = {layer.name: layer for layer in am.layers}
    # reproduce the plan's choice: the ratios it gave the groups
    planned = {entry["name"]: float(entry.get("allocated_sparsity", entry["sparsity"])) for entry in pl.layers}
    unknown = [name for name in planned if name not in by_name]
    if unknown:
        raise InputError(f"the plan names layer(s) not in the model: {unknown[:3]}; make a new plan")
    cg = am.channel_graph(pl.options.get("coupled", "prune"))
    counts = None
    if pl.options.get("group_removed") and round_to == pl.options.get("round_to", 1):
        counts = {tuple(e["layers"]): int(e["removed"]) for e in pl.options["group_removed"]}  # the plan's counts
    remove, choices = choose(cg, planned, criterion, round_to, counts)
    passes = []
    refit = None
    if spec is not None:
        provider, batches = calibration_batches(am.model, spec)
        refit = RefitPass(cg, remove, [f for f, _ in batches], provider=provider, progress=progress)
        passes.append(refit)
    out_before = {name: len(elems) for name, elems in cg.produced.items()}
    shrink = ShrinkChannelsPass(cg, remove)
    options = {"granularity": "channel", "criterion": criterion, "round_to": round_to,
               "refit_data": None if spec is None else spec.record()}
    passes += [shrink, RemoveUnusedNodesPass(), _provenance(pl, am.fingerprint, options)]
    run_passes(am.model, passes)
    after = summarise(am.after_rewrite(), fingerprint=False)
    blocked = [g for g in cg.groups() if not g["prunable"] and any(planned.get(n, 0) > 0 for n in g["layers"])]
    totals = {
        "granularity": "channel", "criterion": criterion, "round_to": round_to, **_size_change(before, after),
        "channels_removed": sum(c.removed for c in choices),
        "groups": len(choices), "groups_changed": sum(c.removed > 0 for c in choices), "groups_blocked": len(blocked),
        "planned_params_sparsity": pl.totals.get("params_sparsity"),
        "planned_flops_sparsity": pl.totals.get("flops_sparsity"),
    }
    if refit is not None:
        rep = refit.report
        totals["refit"] = {"layers": len(rep.refit), "samples": rep.samples, "skipped": rep.skipped,
                           "mean_error_before": float(np.mean(list(rep.error_before.values()) or [0.0])),
                           "mean_error_after": float(np.mean(list(rep.error_after.values()) or [0.0]))}
    saved = target.save(am)
    out_after = shrink.channels_after
    per_layer = [{"name": name, "planned_sparsity": planned.get(name, 0.0), "channels": out_before[name],
                  "channels_after": out_after[name],
                  "sparsity": 1 - out_after[name] / out_before[name] if out_before[name] else 0.0}
                 for name in out_before]
    return ApplyResult(path=saved.path, layers=per_layer, totals=totals,
                       input_bytes=model_file_bytes(target.input_path), output_bytes=saved.size_bytes,
                       sparse_initializers=[], skipped=describe_blocked(blocked), checked=target.checked(False),
                       folder=target.folder)


def _size_change(before, after) -> dict:
    """Parameters and FLOPs before and after a structural rewrite, and the fractions removed."""
    return {"params_before": before.params, "params_after": after.params,
            "flops_before": before.flops, "flops_after": after.flops,
            "params_fraction_removed": 1 - after.params / before.params if before.params else 0.0,
            "flops_fraction_removed": (1 - after.flops / before.flops if before.flops else 0.0)
            if after.flops is not None and before.flops is not None else None}


def _provenance(pl: Plan, input_fingerprint: str, options: dict) -> ProvenancePass:
    """What made this model: version, the input's fingerprint, the plan (digest) and the options."""
    record = {"onnxprune_version": __version__, "input_fingerprint": input_fingerprint, "options": options,
              "plan": {"method": pl.method, "seed": pl.seed, "budget": pl.budget, "granularity": pl.granularity,
                       "layers": len(pl.layers), "blocks": [b["name"] for b in pl.blocks],
                       "sha256": hashlib.sha256(json.dumps(pl.to_dict(), sort_keys=True).encode()).hexdigest()[:32]}}
    return ProvenancePass(APPLY_METADATA, record)
