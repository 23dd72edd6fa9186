"""Data-free layer capacity from a layer's weight tensor W, viewed as a matrix (outputs x inputs*kh*kw).

Metrics (each named in scores.json):

- ``mean_abs``: mean |w|.
- ``l2``: ||W||_F / sqrt(n), the L2 norm per parameter (root mean square weight).
- ``effective_rank``: exp(H(p)) / min(out, in), with p_i = sigma_i / sum_j sigma_j the normalised singular
  values and H the Shannon entropy (Roy & Vetterli 2007): the fraction of the layer's full rank it uses.
- ``stable_rank``: (||W||_F^2 / ||W||_2^2) / min(out, in), also a fraction of full rank.

Importance = metric / max over layers (the most important layer has importance 1).

Speed: norm metrics read each weight once, in 1M-element chunks of the memory map. Rank metrics use the
exact spectrum (eigenvalues of the Gram matrix of the smaller side) up to ``EXACT_RANK_LIMIT`` on the smaller
side; above it, a randomized SVD (``RANDOMIZED_K`` singular values, 2 power iterations) gives the top
spectrum, ||W||_2 for the stable rank, and the remaining energy ||W||_F^2 - sum of the top sigma_i^2 is
spread evenly over the remaining singular values for the entropy; the error of this approximation is
measured in BENCHMARKS.md.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.analysis.layers import Layer
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Scores
from onnxprune.errors import InputError
from onnxprune.scoring.common import Progress, ScoreRequest, layer_entry, owned_layers, relative_to_max
from onnxprune.tensors.weights import as_matrix, get_weight, release_weight

__all__ = ["DEFAULT_METRIC", "EXACT_RANK_LIMIT", "METRICS", "NORM_METRICS", "RANDOMIZED_K", "check",
           "effective_rank_fraction", "layer_metrics", "norms", "score_capacity", "singular_values"]

METRICS = {
    "mean_abs": "mean |w|",
    "l2": "||W||_F / sqrt(n): L2 norm per parameter",
    "effective_rank": "exp(entropy of normalised singular values) / min(out, in)",
    "stable_rank": "||W||_F^2 / ||W||_2^2 / min(out, in)",
}
DEFAULT_METRIC = "stable_rank"  # the best capacity metric of the allocation benchmark
NORM_METRICS = ("mean_abs", "l2")
EXACT_RANK_LIMIT = 2048
RANDOMIZED_K = 256
_CHUNK = 1 << 20  # elements per chunk of a norm pass: cache-sized, so each weight is read from memory once


def norms(w: np.ndarray) -> tuple[float, float]:
    """(sum |w|, sum w^2), one chunked pass over the (memory-mapped) array. Each chunk's |w| sum accumulates
    in float64 and its sum of squares is a BLAS dot in the weight's precision (relative error about 1e-6 per
    chunk); chunk totals add up in float64."""
    flat = w.reshape(-1)
    s1 = s2 = 0.0
    for start in range(0, flat.size, _CHUNK):
        c = flat[start : start + _CHUNK]
        if c.dtype not in (np.float32, np.float64):
            c = c.astype(np.float32)
        s1 += float(np.abs(c).sum(dtype=np.float64))
        s2 += float(np.dot(c, c))
    return s1, s2


def singular_values(m: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float, bool]:
    """(top singular values, total energy ||M||_F^2, exact?)."""
    m = np.asarray(m, dtype=np.float32)
    small = min(m.shape)
    energy = float(np.dot(m.reshape(-1).astype(np.float64), m.reshape(-1).astype(np.float64)))
    if small <= EXACT_RANK_LIMIT:
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        eig = np.linalg.eigvalsh(gram.astype(np.float64))
        return np.sqrt(np.clip(eig[::-1], 0.0, None)), energy, True
    k = min(RANDOMIZED_K, small)
    rng = np.random.default_rng(seed)
    q = m @ rng.standard_normal((m.shape[1], k + 10), dtype=np.float32)
    for _ in range(2):
        q, _ = np.linalg.qr(q)
        q = m @ (m.T @ q)
    q, _ = np.linalg.qr(q)
    sigma = np.linalg.svd(q.T @ m, compute_uv=False)[:k]
    return sigma.astype(np.float64), energy, False


def effective_rank_fraction(sigma: np.ndarray, energy: float, rank: int, exact: bool) -> float:
    if not exact:
        rest = rank - len(sigma)
        tail = max(energy - float(np.sum(sigma**2)), 0.0)
        if rest > 0 and tail > 0:
            sigma = np.concatenate([sigma, np.full(rest, math.sqrt(tail / rest))])
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(math.exp(-np.sum(p * np.log(p)))) / rank


def layer_metrics(layer: Layer, metrics: list[str]) -> tuple[dict[str, float], dict]:
    """The requested metrics of one layer, and notes on how they were computed."""
    w = get_weight(layer)
    values: dict[str, float] = {}
    info: dict = {}
    n = w.size
    if any(m in NORM_METRICS for m in metrics):
        s1, s2 = norms(w)
        values["mean_abs"] = s1 / n
        values["l2"] = math.sqrt(s2 / n)
    if any(m in ("effective_rank", "stable_rank") for m in metrics):
        mat = as_matrix(layer, w)
        sigma, energy, exact = singular_values(mat)
        rank = min(mat.shape)
        info["rank_method"] = "exact" if exact else f"randomized (top {len(sigma)} singular values)"
        values["effective_rank"] = effective_rank_fraction(sigma, energy, rank, exact)
        top = float(sigma[0]) if len(sigma) else 0.0
        values["stable_rank"] = (energy / top**2) / rank if top > 0 else 0.0
    return {m: values[m] for m in values if m in metrics or m in NORM_METRICS}, info


def check(request: ScoreRequest) -> None:
    metric = request.metric or DEFAULT_METRIC
    if metric not in METRICS:
        raise InputError(f"unknown capacity metric {metric!r}; use one of {', '.join(METRICS)}")


def score_capacity(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    """Each layer's capacity metric; importance = metric / the largest."""
    metric = request.metric or DEFAULT_METRIC
    layers = owned_layers(am)
    units = []
    for i, layer in enumerate(layers):
        values, how = layer_metrics(layer, [metric])
        release_weight(layer)
        units.append({**layer_entry(am, layer), "metrics": values, **how})
        if progress:
            progress(i + 1, len(layers))
    for unit, imp in zip(units, relative_to_max([u["metrics"][metric] for u in units]), strict=True):
        unit["importance"] = imp
    return Scores(method="capacity", fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                  units=units, metric=metric,
                  options={"metric_definition": METRICS[metric]})
