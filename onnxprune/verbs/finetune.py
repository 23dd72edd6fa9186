"""``finetune``: recover a pruned model's accuracy by training (onnxprune.recovery), then write the same
graph with the trained weights, checked, and measure it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune._version import __version__
from onnxprune.analysis.input_shapes import merge_data_shapes, parse_input_shapes
from onnxprune.errors import InputError
from onnxprune.io import check_output_path, fingerprint, load_model, save_model
from onnxprune.passes import ProvenancePass
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import data_input_shapes
from onnxprune.verbs.apply import check_runs
from onnxprune.verbs.evaluate import evaluate
from onnxprune.verbs.loading import InputShapesLike, data_path

__all__ = ["FINETUNE_METADATA", "FinetuneResult", "finetune"]

FINETUNE_METADATA = "onnxprune.finetune"


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
    input_shapes: InputShapesLike = None,
    **data_options,
) -> FinetuneResult:
    """Fine-tune (labels) and/or distil (``teacher``: the unpruned ONNX model) ``model`` on ``data`` and write
    the same graph with the trained weights to ``output``; needs torch (``pip install 'onnxprune[torch]'``).

    ``options``: a ``onnxprune.FinetuneOptions`` (epochs, lr, batch_size, augment, ...);
    ``epochs=0`` only recalibrates BatchNorm. ``labels``: use the data's labels (default: when it has them).
    ``eval_data``: held-out data (an .npz path or DataSpec) measured after every epoch and, with ONNX Runtime,
    on the written model. ``progress(phase, done, total, info)``: phase is teacher, calibrated, train or epoch.
    Graphs without BatchNormalization get one after each convolution for training, folded back on export.
    The written model is checked at the sizes of the data (``input_shapes``, see onnxprune.api.inspect, must
    agree with it).

    >>> from onnxprune import FinetuneOptions  # doctest: +SKIP
    >>> finetune("pruned.onnx", "train.npz", "tuned.onnx", teacher="model.onnx",
    ...          options=FinetuneOptions(epochs=10), eval_data="test.npz").after_top1  # doctest: +SKIP
    """
    try:
        from onnxprune.recovery import finetune as ft
        from onnxprune.recovery.orchestrate import finetune_model
    except ImportError as exc:
        raise InputError(f"finetune needs torch ({exc}); install it with: pip install 'onnxprune[torch]'") from exc
    opts = options or ft.FinetuneOptions()
    opts.check()
    start, start_cpu = time.perf_counter(), time.process_time()
    spec = rdata.DataSpec.of(data, **data_options)
    check_output_path(Path(output), input_path=model, force=force)
    check_output_path(Path(output), input_path=[teacher, spec.data, data_path(eval_data)], forceable=False)
    m = load_model(model)
    shapes = merge_data_shapes(parse_input_shapes(input_shapes, m), data_input_shapes(m, spec), m)
    input_fp = fingerprint(m)
    run = finetune_model(m, model, spec, opts, teacher=teacher, labels=labels, eval_data=eval_data,
                         progress=progress, start=start, start_cpu=start_cpu)
    rep, opts = run.report, run.options
    ProvenancePass(FINETUNE_METADATA, {
        "onnxprune_version": __version__, "epochs": len(rep.history), "labels": run.labels, "seed": opts.seed,
        "teacher": None if teacher is None else Path(teacher).name, "inserted_bn_folded": rep.inserted_bn,
        "input_fingerprint": input_fp, "data": spec.record(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()}},
        keep_previous=False)(m)
    saved = save_model(m, output, input_path=model, force=force,
                       verify=(lambda path: check_runs(path, shapes)) if check else None)
    after = None if run.eval_spec is None else evaluate(saved.path, run.eval_spec).top1
    notes = []
    if rep.inserted_bn:
        notes.append(f"{rep.inserted_bn} BatchNormalization layers were inserted after convolutions for training "
                     f"({rep.teacher_matched} started from the teacher's statistics) and folded back on export")
    if rep.masked_weights:
        notes.append(f"{rep.masked_weights:,} zero weights were kept at zero")
    return FinetuneResult(
        path=saved.path, history=[r.to_dict() for r in rep.history], before_top1=rep.initial_eval_top1,
        calibrated_top1=rep.calibrated_eval_top1, after_top1=after, inserted_bn=rep.inserted_bn,
        graph_bn=rep.graph_bn, teacher_matched=rep.teacher_matched, masked_weights=rep.masked_weights,
        labels=run.labels, teacher=None if teacher is None else str(teacher),
        seconds=time.perf_counter() - start, teacher_seconds=run.teacher_seconds,
        calibration_seconds=rep.calibration_seconds, options=dict(opts.__dict__), notes=notes + rep.notes)
