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
from onnxprune.runtime.language_model import decoder_of, next_token_nll
from onnxprune.runtime.metrics import Accuracy, output_error
from onnxprune.runtime.session import create_session
from onnxprune.runtime.timing import lm_latency
from onnxprune.verbs.loading import InputShapesLike, open_model

__all__ = ["TASKS", "EvalResult", "LanguageModelResult", "evaluate"]

TASKS = ("auto", "classification", "lm")


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
    output_error: float | None = None  # percent, mean over samples, against ``reference`` (runtime.metrics)
    reference: str | None = None
    language_model: LanguageModelResult | None = None  # perplexity and latency of a decoder LM (--task lm)

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
            "output_error": self.output_error,
            "reference": self.reference,
            "language_model": None if self.language_model is None else self.language_model.to_dict(),
        }


@dataclass
class LanguageModelResult:
    """A decoder LM on token sequences: perplexity of each next token (positions 1..n-1 of every sequence),
    and ONNX Runtime latency at batch 1: the prefill of ``context`` tokens, one decode step after them."""

    perplexity: float
    tokens: int  # next tokens scored
    context: int
    prefill_ms: float | None
    decode_ms: float | None

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "context": self.context,
                "prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms}


def evaluate(
    model: str | os.PathLike,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    input_shapes: InputShapesLike = None,
    reference: str | os.PathLike | None = None,
    task: str = "auto",
    latency: bool = True,
    **data_options,
) -> EvalResult:
    """Top-1 / top-5 accuracy and throughput of ``model`` with ONNX Runtime; with a ``reference`` model (the
    one it was pruned from), also how far its outputs are from the reference's on the same data
    (``output_error``: onnxprune.runtime.metrics.output_error, percent, 0 = identical), for any outputs.

    ``data``: an .npz path or a DataSpec; ``data_options``: the DataSpec fields as keywords (input_key,
    label_key, mean, std, batch_size, limit, offset, provider, data_loader_script). uint8 inputs are scaled
    to [0, 1], then ``(x - mean) / std`` per channel; mean and std default to the model's
    ``onnxprune.preprocess.*`` metadata when it has some. ``progress(done, total)`` is called after each batch.
    ``input_shapes`` (see onnxprune.api.inspect) are checked against the data, which fixes the sizes run.

    ``task``: ``lm`` for a decoder language model (onnxprune.runtime.language_model; ``auto`` detects one):
    the data holds token sequences (``input_ids``), fed as prefills; the result's ``language_model`` has the
    perplexity, and (``latency``) prefill / per-token decode milliseconds at batch 1 with the KV cache at the
    data's sequence length.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    spec = rdata.DataSpec.of(data, **data_options)
    m = load_model(model)
    if input_shapes:
        open_model(m, input_shapes=input_shapes, data=spec)  # a setting that contradicts the data is an error
    decoder = decoder_of(m)
    if task == "lm" and decoder is None:
        raise InputError(f"{model} is not a decoder language model (an integer input_ids input and a logits output "
                         "of shape (batch, sequence, vocabulary)); drop --task lm")
    if task == "classification":
        decoder = None
    sess = create_session(model, spec.provider)
    batches, total, preprocess_note = feed_batches(m, sess, spec)
    ref_sess = _reference_session(reference, sess, spec)
    acc = Accuracy()
    run_seconds = 0.0
    errors: list[np.ndarray] = []
    nll, tokens, context = 0.0, 0, 0
    start = time.perf_counter()
    outputs = [o.name for o in sess.session.get_outputs()]
    measured = outputs[0] if decoder is None else decoder.logits  # class scores, or a language model's logits
    run_outputs = outputs if ref_sess is not None else [measured]
    for feeds, labels in batches:
        t0 = time.perf_counter()
        outs = sess.run(feeds, run_outputs)
        run_seconds += time.perf_counter() - t0
        scores = np.asarray(outs[run_outputs.index(measured)])
        acc.update(scores, labels)
        if decoder is not None:
            ids = feeds[decoder.input_ids]
            nll += float(next_token_nll(scores, ids).sum())
            tokens += ids.shape[0] * (ids.shape[1] - 1)
            context = ids.shape[1]
        if ref_sess is not None:
            refs = ref_sess.run(feeds, None)
            if [np.shape(r) for r in refs] != [np.shape(o) for o in outs]:
                raise InputError(f"--reference {reference} gives outputs of shapes "
                                 f"{[list(np.shape(r)) for r in refs]}, the model {[list(np.shape(o)) for o in outs]}; "
                                 "give the model it was pruned from")
            errors.append(output_error(refs, outs))
        if progress:
            progress(acc.samples, total)
    if acc.samples == 0:
        raise InputError("the data has no samples; check --data / --limit")
    lm = None
    if decoder is not None:
        timed = lm_latency([model], spec.provider, context)[0] if latency else (None, None)
        lm = LanguageModelResult(float(np.exp(nll / max(tokens, 1))), tokens, context, *timed)
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
        output_error=float(np.concatenate(errors).mean()) if errors else None,
        reference=None if reference is None else str(reference),
        language_model=lm,
    )


def _reference_session(reference, sess, spec: rdata.DataSpec):
    """An ONNX Runtime session of the ``reference`` model, whose inputs and outputs must match the model's."""
    if reference is None:
        return None
    ref = create_session(reference, spec.provider)
    mine, theirs = sess.session.get_outputs(), ref.session.get_outputs()
    if len(mine) != len(theirs):
        raise InputError(f"--reference {reference} has {len(theirs)} output(s), the model {len(mine)}; give the "
                         "model it was pruned from")
    inputs = {i.name for i in sess.session.get_inputs()}
    if {i.name for i in ref.session.get_inputs()} != inputs:
        raise InputError(f"--reference {reference} takes other inputs than the model; give the model it was "
                         "pruned from")
    return ref
