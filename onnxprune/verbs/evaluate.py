"""``eval``: top-1 / top-5 accuracy and throughput of a model with ONNX Runtime."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import InputError
from onnxprune.io import load_model
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import batches as feed_batches
from onnxprune.runtime.feeding import fed_batch_size
from onnxprune.runtime.metrics import Accuracy
from onnxprune.runtime.session import create_session
from onnxprune.verbs.loading import InputShapesLike, open_model

__all__ = ["EvalResult", "evaluate"]


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
    input_shapes: InputShapesLike = None,
    **data_options,
) -> EvalResult:
    """Top-1 / top-5 accuracy and throughput of ``model`` with ONNX Runtime.

    ``data``: an .npz path or a DataSpec; ``data_options``: the DataSpec fields as keywords (input_key,
    label_key, mean, std, batch_size, limit, offset, provider, data_loader_script). uint8 inputs are scaled
    to [0, 1], then ``(x - mean) / std`` per channel; mean and std default to the model's
    ``onnxprune.preprocess.*`` metadata when it has some. ``progress(done, total)`` is called after each batch.
    ``input_shapes`` (see onnxprune.api.inspect) are checked against the data, which fixes the sizes run.
    """
    spec = rdata.DataSpec.of(data, **data_options)
    m = load_model(model)
    if input_shapes:
        open_model(m, input_shapes=input_shapes, data=spec)  # a setting that contradicts the data is an error
    sess = create_session(model, spec.provider)
    batches, total, preprocess_note = feed_batches(m, sess, spec)
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
        batch_size=fed_batch_size(sess, spec),
        notice=sess.notice,
        preprocess=preprocess_note,
    )
