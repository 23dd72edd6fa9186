"""Latency of models with ONNX Runtime, measured in interleaved rounds so that machine noise hits all alike."""

from __future__ import annotations

import os
import time

import numpy as np

from onnxprune.runtime import data as rdata
from onnxprune.runtime.input_values import value_feed
from onnxprune.runtime.language_model import Decoder
from onnxprune.runtime.session import create_session

__all__ = ["latency", "lm_latency", "random_feeds"]


def random_feeds(sess, batch: int = 1, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None,
                 values: dict[str, tuple[float, ...]] | None = None, decoder: Decoder | None = None
                 ) -> dict[str, np.ndarray]:
    """One input per model input, floats N(0, 1): a dynamic leading dimension becomes ``batch``, the others
    their size in ``shapes`` (onnxprune.analysis.input_shapes), else 1; inputs in ``values`` (--input-value)
    get those values. A ``decoder`` LM (onnxprune.runtime.language_model) gets random tokens (their length
    from ``shapes``, else 8) as a prefill from an empty cache."""
    rng = np.random.default_rng(seed)
    if decoder is not None:  # a prefill of random tokens from an empty cache
        length = next((d for d in (shapes or {}).get(decoder.input_ids, ())[1:]), None) or 8
        return decoder.prefill(rng.integers(0, decoder.vocab or 2, (batch, length)))
    feeds = {}
    inputs = sess.get_inputs()
    batch_dim = inputs[0].shape[0] if inputs and inputs[0].shape else None
    for spec in inputs:
        if spec.name in (values or {}):
            dtype = rdata.InputSpec(spec.name, spec.type, spec.shape).dtype
            feeds[spec.name] = value_feed(spec.name, spec.shape, dtype, values[spec.name], batch, batch_dim)
            continue
        given = (shapes or {}).get(spec.name)
        shape = [d if isinstance(d, int) and d > 0 else batch if i == 0 else given[i] if given else 1
                 for i, d in enumerate(spec.shape)]
        dtype = rdata.InputSpec(spec.name, spec.type, spec.shape).dtype or np.float32
        feeds[spec.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else np.zeros(shape, dtype))
    return feeds


def latency(paths: list[str | os.PathLike], provider: str = "cpu", batch: int = 1, runs: int = 20,
            rounds: int = 3, shapes: dict[str, tuple[int, ...]] | None = None,
            values: dict[str, tuple[float, ...]] | None = None) -> list[float]:
    """Median milliseconds per run of each model at ``batch`` (and ``shapes`` and ``values``, see
    random_feeds), timed in ``rounds`` interleaved rounds."""
    sessions = [create_session(p, provider).session for p in paths]
    feeds = [random_feeds(s, batch, shapes=shapes, values=values) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):  # warm up
        for _ in range(3):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for k, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, f)
                times[k].append(time.perf_counter() - t)
    return [1000 * float(np.median(t)) for t in times]


def lm_latency(paths: list[str | os.PathLike], provider: str = "cpu", context: int = 256, runs: int = 5,
               rounds: int = 3, seed: int = 0) -> list[tuple[float, float]]:
    """(prefill ms, per-token decode ms) of each decoder LM at batch 1: the prefill of ``context`` tokens from
    an empty cache, and one token after a cache of ``context`` tokens; medians over ``rounds`` interleaved
    rounds of ``runs`` runs each."""
    from onnxprune.io import load_model
    from onnxprune.runtime.language_model import decoder_of

    sessions, cases = [], []
    rng = np.random.default_rng(seed)
    for path in paths:
        decoder = decoder_of(load_model(path, check=False))
        if decoder is None:
            raise ValueError(f"{path} is not a decoder language model")
        ids = rng.integers(0, decoder.vocab or 2, (1, context + 1))
        sessions.append(create_session(path, provider).session)
        cases.append((decoder.feeds(ids[:, :context], past_length=0),
                      decoder.feeds(ids[:, context:], past_length=context, seed=seed)))
    times = [([], []) for _ in paths]
    for s, feeds in zip(sessions, cases, strict=True):  # warm up
        for f in feeds:
            s.run(None, f)
    for _ in range(rounds):
        for k, (s, feeds) in enumerate(zip(sessions, cases, strict=True)):
            for phase, f in enumerate(feeds):
                for _ in range(runs):
                    t = time.perf_counter()
                    s.run(None, f)
                    times[k][phase].append(time.perf_counter() - t)
    return [(1000 * float(np.median(p)), 1000 * float(np.median(d))) for p, d in times]
