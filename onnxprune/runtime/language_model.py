"""Decoder language models as exporters write them, and what measuring one needs.

Optimum's exports and ONNX Runtime GenAI's model builder agree on the names: token ids ``input_ids``, an
``attention_mask`` over past and new tokens, sometimes ``position_ids``, one past input per layer and K/V
(``past_key_values.N.key``) and a ``logits`` output (batch, sequence, vocabulary), with the present cache as
more outputs. Measuring one on token data (SR-init, perplexity, latency) feeds ``input_ids`` from the data
and the rest as a prefill from an empty cache: mask of ones, positions 0..n-1, past of length 0.

A past input's head size is its declared last dimension; GenAI declares it symbolic (``kv_cache_dim``), and
then it is read from the GroupQueryAttention / MultiHeadAttention node that takes the past: the packed
query-key-value width over ``num_heads + 2 * kv_num_heads``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import constant_source

__all__ = ["Decoder", "TokenReference", "decoder_of", "next_token_nll"]


@dataclass
class Decoder:
    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past: dict[str, tuple]  # past input -> declared shape, the head size filled in (symbols: batch, length)
    past_dtypes: dict[str, np.dtype]
    int_dtypes: dict[str, np.dtype]  # input_ids / attention_mask / position_ids -> their dtype
    logits: str
    vocab: int | None

    def prefill(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every input for running ``ids`` (batch, sequence) from an empty cache."""
        return self.feeds(ids, past_length=0)

    def feeds(self, ids: np.ndarray, past_length: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs for ``ids`` after ``past_length`` cached tokens (random cache values: for timing)."""
        batch, length = ids.shape
        feeds = {self.input_ids: ids.astype(self.int_dtypes[self.input_ids], copy=False)}
        if self.attention_mask is not None:
            feeds[self.attention_mask] = np.ones((batch, past_length + length), self.int_dtypes[self.attention_mask])
        if self.position_ids is not None:
            positions = np.arange(past_length, past_length + length)[None].repeat(batch, 0)
            feeds[self.position_ids] = positions.astype(self.int_dtypes[self.position_ids])
        rng = np.random.default_rng(seed)
        for name, shape in self.past.items():
            dims = [batch if i == 0 else past_length if isinstance(d, str) else d for i, d in enumerate(shape)]
            feeds[name] = rng.standard_normal(dims).astype(self.past_dtypes[name]) * 0.1
        return feeds

    @property
    def layers(self) -> int:
        """Cache layers: past inputs per K and V."""
        return len(self.past) // 2 if len(self.past) > 1 else len(self.past)


_INT = (ir.DataType.INT64, ir.DataType.INT32)


def decoder_of(model: ir.Model) -> Decoder | None:
    """The decoder-LM signature of ``model``, or None when it is not one (no integer ``input_ids`` input, or
    no ``logits`` output of rank 3)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    ids = inputs.get("input_ids")
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if ids is None or ids.dtype not in _INT or logits is None or logits.shape is None or len(logits.shape) != 3:
        return None
    extra = {name: inputs[name] for name in ("attention_mask", "position_ids")
             if name in inputs and inputs[name].dtype in _INT}
    past: dict[str, tuple] = {}
    past_dtypes = {}
    for name, value in inputs.items():
        if name == "input_ids" or name in extra:
            continue
        if "past" not in name or value.shape is None or len(value.shape) != 4 or value.dtype is None:
            return None  # an input the token data cannot supply: not a plain decoder
        dims = [d if isinstance(d, int) else str(d) for d in value.shape]
        if not isinstance(dims[3], int):
            head = _head_size(value)
            if head is None:
                return None
            dims[3] = head
        past[name] = tuple(dims)
        past_dtypes[name] = value.dtype.numpy()
    vocab = logits.shape[2] if isinstance(logits.shape[2], int) else None
    ints = {name: v.dtype.numpy() for name, v in [("input_ids", ids), *extra.items()]}
    return Decoder("input_ids", "attention_mask" if "attention_mask" in extra else None,
                   "position_ids" if "position_ids" in extra else None, past, past_dtypes, ints, "logits", vocab)


def _head_size(past: ir.Value) -> int | None:
    """The head size of a past input whose shape leaves it symbolic, from the attention node taking it."""
    for use in past.uses():
        node = use.node
        heads = node.attributes.get_int("num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0) or heads
        if node.op_type not in ("GroupQueryAttention", "MultiHeadAttention") or not heads:
            continue
        key = node.inputs[1] if len(node.inputs) > 1 else None
        if key is not None and _width(key):
            return _width(key) // kv_heads
        width = _width(node.inputs[0])
        if width:
            return width // (heads + 2 * kv_heads)
    return None


def _width(value: ir.Value | None) -> int | None:
    """The last dimension of ``value``: declared, or the output width of the MatMul (MatMulNBits) making it."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    while node is not None and node.op_type == "Add":  # a bias after the projection
        node = next((i.producer() for i in node.inputs if i is not None and constant_source(i) is None), None)
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", 0) or None
    if node.op_type == "MatMul" and constant_source(node.inputs[1]) is not None:
        shape = node.inputs[1].shape
        return shape[-1] if shape is not None and isinstance(shape[-1], int) else None
    return None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per sequence, the summed negative log-likelihood of each next token (positions 1..n-1)."""
    logp = _log_softmax(logits[:, :-1])
    picked = np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return -picked.sum(axis=1)


class TokenReference:
    """One batch's reference next-token distributions, worked out once for the many models compared with
    them (SR-init: every unit and seed). Per model, KL(reference || model) then costs one log-softmax of the
    model's logits and one weighted sum over the vocabulary: KL = sum p log p - sum p log q, the first term
    kept. Identical logits give exactly 0. The work is split over ``threads`` threads by positions (numpy
    lets go of the GIL); each position's numbers do not depend on the split."""

    def __init__(self, logits: np.ndarray, threads: int = 1):
        self.shape = logits.shape[:-1]
        rows = logits.reshape(-1, logits.shape[-1])
        self._chunks = _row_chunks(len(rows), max(int(threads), 1))
        parts = self._map(lambda a, b: _reference_rows(rows[a:b]))
        self.prob = np.concatenate([prob for prob, _, _ in parts])
        self.expected_logp = np.concatenate([expected for _, expected, _ in parts])
        self.top = np.concatenate([top for _, _, top in parts])

    def kl(self, logits: np.ndarray) -> np.ndarray:
        """Per sequence, the mean over positions of KL(reference || model)."""
        rows = logits.reshape(-1, logits.shape[-1])
        cross = np.concatenate(self._map(lambda a, b: (self.prob[a:b] * _log_softmax(rows[a:b])).sum(axis=-1)))
        return (self.expected_logp - cross).reshape(self.shape).mean(axis=1)

    def disagreement(self, logits: np.ndarray) -> np.ndarray:
        """Per sequence, the share of positions whose most likely next token differs."""
        rows = logits.reshape(-1, logits.shape[-1])
        top = np.concatenate(self._map(lambda a, b: rows[a:b].argmax(-1)))
        return (top != self.top).reshape(self.shape).mean(axis=1)

    def _map(self, fn) -> list:
        """``fn(start, stop)`` over the position chunks, in threads; results in chunk order."""
        if len(self._chunks) == 1:
            return [fn(*self._chunks[0])]
        with ThreadPoolExecutor(len(self._chunks)) as pool:
            return list(pool.map(lambda chunk: fn(*chunk), self._chunks))


def _reference_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, sum p log p, most likely token) of rows of logits."""
    logp = _log_softmax(rows)
    prob = np.exp(logp)
    return prob, (prob * logp).sum(axis=-1), rows.argmax(-1)


def _row_chunks(rows: int, threads: int) -> list[tuple[int, int]]:
    size = -(-rows // max(min(threads, rows), 1))
    return [(i, min(i + size, rows)) for i in range(0, rows, size)] or [(0, 0)]
