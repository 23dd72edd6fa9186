"""Which weights to zero: by magnitude (unstructured) or N:M, and the masked copy of a weight.

One module for every caller: the sparsify pass, sensitivity curves, compactness and the allocation search
all prune by the same rule (smallest |w| first, ties broken by position, so results are reproducible).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_mask", "magnitude_mask", "magnitude_order", "nm_mask", "pruned_copy"]


def magnitude_mask(w: np.ndarray, zeros: int) -> np.ndarray:
    """0/1 mask of w's shape with the ``zeros`` smallest |w| set to 0, ties by position: the first ``zeros``
    of a stable argsort, found in linear time (the k-th smallest value, then the ties at it in order)."""
    a = np.abs(np.asarray(w)).reshape(-1)
    if zeros <= 0:
        return np.ones(w.shape, dtype=bool)
    if zeros >= a.size:
        return np.zeros(w.shape, dtype=bool)
    kth = np.partition(a, zeros - 1)[zeros - 1]
    pruned = a < kth
    pruned[np.flatnonzero(a == kth)[: zeros - int(np.count_nonzero(pruned))]] = True
    return ~pruned.reshape(w.shape)


def magnitude_order(w: np.ndarray) -> np.ndarray:
    """Flat indices of w from smallest to largest |w| (ties by position): computed once, pruned many times."""
    return np.argsort(np.abs(np.asarray(w)).reshape(-1), kind="stable")


def pruned_copy(w: np.ndarray, order: np.ndarray, zeros: int) -> np.ndarray:
    """A copy of w with its ``zeros`` smallest weights (by ``order``) set to 0."""
    flat = np.array(w, copy=True).reshape(-1)
    flat[order[:zeros]] = 0
    return flat.reshape(w.shape)


def nm_mask(w: np.ndarray, n: int, m: int, in_axis: int) -> np.ndarray | None:
    """Keep the n largest |w| in each group of m along ``in_axis``; None if that axis is not a multiple of m."""
    if w.shape[in_axis] % m:
        return None
    moved = np.moveaxis(np.abs(np.asarray(w)), in_axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, in_axis)


def apply_mask(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """w where the mask is 1, else 0, in w's dtype."""
    return np.where(mask, w, np.zeros((), dtype=w.dtype)).astype(w.dtype, copy=False)
