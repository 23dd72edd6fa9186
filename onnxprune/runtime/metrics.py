"""Classification metrics accumulated over batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Accuracy", "log_softmax", "topk_hits"]


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
