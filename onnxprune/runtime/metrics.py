"""Metrics of a model's outputs: classification (top-k, log-softmax) for class scores, and output fidelity
(``output_error``) for outputs of any kind (boxes, probability maps, embeddings, several outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Accuracy", "Reference", "class_scores", "log_softmax", "output_error", "topk_hits"]


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of samples whose label is among the ``k`` highest scores."""
    logits = logits.reshape(logits.shape[0], -1)
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < logits.shape[1] else np.arange(logits.shape[1])[None]
    return int(np.any(top == labels.reshape(-1, 1), axis=1).sum())


@dataclass
class Accuracy:
    samples: int = 0
    top1: int = 0
    top5: int = 0
    labelled: int = 0

    def update(self, logits: np.ndarray, labels: np.ndarray | None) -> None:
        self.samples += logits.shape[0]
        if labels is None:
            return
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        self.labelled += labels.shape[0]
        self.top1 += topk_hits(logits, labels, 1)
        self.top5 += topk_hits(logits, labels, 5)

    def percent(self, hits: int) -> float | None:
        return None if self.labelled == 0 else 100.0 * hits / self.labelled


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def output_error(refs: list[np.ndarray], outs: list[np.ndarray]) -> np.ndarray:
    """Per sample, in percent: the squared error of each output relative to the reference output's squared
    norm, averaged over the outputs (0 = identical; 100 = as far off as an all-zero output)."""
    samples = np.shape(refs[0])[0] if np.ndim(refs[0]) else 1
    per_output = []
    for ref, out in zip(refs, outs, strict=True):
        r, y = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        axis = _sample_axis(r.shape, samples)
        if axis is None:  # no per-sample axis (a scalar, a table): its error counts for every sample
            err = ((y - r) ** 2).sum() / max(float((r ** 2).sum()), 1e-12)
            per_output.append(np.full(samples, err))
            continue
        r = np.moveaxis(r, axis, 0).reshape(samples, -1)
        y = np.moveaxis(y, axis, 0).reshape(samples, -1)
        per_output.append(((y - r) ** 2).sum(axis=1) / np.maximum((r ** 2).sum(axis=1), 1e-12))
    return 100.0 * np.mean(per_output, axis=0)


def _sample_axis(shape: tuple[int, ...], samples: int) -> int | None:
    """The axis holding the samples: the leading one, else the first of that size (a recurrent state
    (layers, batch, hidden))."""
    if shape and shape[0] == samples:
        return 0
    return next((i for i, d in enumerate(shape) if d == samples), None)


def class_scores(output_shapes: list[tuple | None]) -> bool:
    """Whether a model's outputs look like class scores: a single output of shape (batch, classes >= 2).
    Detectors (boxes x anchors), dense maps and models with several outputs are measured by output_error."""
    if len(output_shapes) != 1 or output_shapes[0] is None or len(output_shapes[0]) != 2:
        return False
    classes = output_shapes[0][1]
    return not (isinstance(classes, int) and classes < 2)


@dataclass
class Reference:
    """The unmodified model's outputs on one batch, and its class scores' log-softmax and top-1."""

    outputs: list[np.ndarray]
    logp: np.ndarray
    top: np.ndarray

    @classmethod
    def of(cls, outputs: list[np.ndarray]) -> Reference:
        logp = log_softmax(outputs[0])
        return cls(list(outputs), logp, logp.argmax(axis=1))
