"""ONNX Runtime's MatMulNBits weights: blockwise-quantised matrices (int4 from GenAI's builder and ORT's
quantizer), read as the float matrix they stand for and written back.

A MatMulNBits node computes ``A @ W`` with W (K, N) stored transposed and quantised in blocks of
``block_size`` along K: ``B`` (uint8, (N, blocks, block_size * bits / 8): 8 / bits values per byte, the
first in the low bits), ``scales`` (N * blocks, or (N, blocks)) and optional ``zero_points`` (uint8, packed
like B, ceil(blocks * bits / 8) bytes per column; default 2^(bits-1)), where
``W[k, n] = (q[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]``.

Writing keeps the quantisation grid where it can: ``on_grid`` re-encodes values with the node's own scales
and zero points (exact for values that came from them: zeros, kept columns); ``quantize`` draws a new grid
(symmetric, the block's largest magnitude at the edge) for new values (a fresh initialisation, a refit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.graph import constant_array

__all__ = ["NBitsWeight", "dequantize", "is_nbits", "nbits_weight", "on_grid", "quantize", "stored_inputs", "take",
           "whole_blocks"]


def is_nbits(node: ir.Node) -> bool:
    return node.op_type == "MatMulNBits" and node.domain == "com.microsoft"


@dataclass
class NBitsWeight:
    """The quantised weight of one MatMulNBits node, unpacked: q (N, K) integers, scales and zero points
    (N, blocks)."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    block_size: int
    bits: int
    zero_points: np.dtype | None  # the stored zero points' type (uint8: packed like B), None: the default
    scales_2d: bool  # scales stored as (N, blocks) rather than flat

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def matrix(self) -> np.ndarray:
        """W (K, N) in the scales' type."""
        expand = np.repeat(np.arange(self.scales.shape[1]), self.block_size)[: self.k]
        w = (self.q.astype(np.float32) - self.zeros[:, expand]) * self.scales[:, expand].astype(np.float32)
        return np.ascontiguousarray(w.T.astype(self.scales.dtype))


def nbits_weight(node: ir.Node) -> NBitsWeight:
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size")
    blocks = -(-k // block)
    packed = np.asarray(constant_array(node.inputs[1]), np.uint8).reshape(n, -1)
    q = _unpack(packed, bits, blocks * block)[:, :k]
    scales = np.asarray(constant_array(node.inputs[2])).reshape(n, blocks)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is not None:
        zp = np.asarray(constant_array(zp_value))
        if zp.dtype == np.uint8:
            zeros = _unpack(zp.reshape(n, -1), bits, blocks).astype(np.float32)
        else:
            zeros = zp.reshape(n, blocks).astype(np.float32)
    else:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    stored = np.asarray(constant_array(node.inputs[2]))
    return NBitsWeight(q, scales, zeros, block, bits, None if zp_value is None else zp.dtype, stored.ndim == 2)


def dequantize(node: ir.Node) -> np.ndarray:
    """The float matrix W (K, N) a MatMulNBits node multiplies by."""
    return nbits_weight(node).matrix()


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)[:, :count]


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    rows, count = q.shape
    pad = (-count) % per_byte
    q = np.concatenate([q, np.zeros((rows, pad), q.dtype)], axis=1) if pad else q
    q = q.reshape(rows, -1, per_byte).astype(np.uint8)
    out = np.zeros(q.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= (q[..., i] << (bits * i)).astype(np.uint8)
    return out


def on_grid(w: np.ndarray, like: NBitsWeight) -> NBitsWeight:
    """W (K, N) encoded with ``like``'s scales and zero points (exact for values that came from them)."""
    return _encode(w, like, like.scales, like.zeros, like.zero_points)


def quantize(w: np.ndarray, like: NBitsWeight) -> NBitsWeight:
    """W (K, N) on a new symmetric grid of ``like``'s block size and bits: each block's largest magnitude at
    the edge of the signed range, zero points 2^(bits-1) (stored when ``like`` stores its own)."""
    wt = np.asarray(w, np.float32).T
    n, k = wt.shape
    blocks = -(-k // like.block_size)
    padded = np.zeros((n, blocks * like.block_size), np.float32)
    padded[:, :k] = wt
    mid = 2 ** (like.bits - 1)
    scales = np.abs(padded.reshape(n, blocks, like.block_size)).max(axis=2) / max(mid - 1, 1)
    scales[scales == 0] = 1.0
    return _encode(w, like, scales.astype(like.scales.dtype), np.full((n, blocks), mid, np.float32),
                   like.zero_points)


def _encode(w: np.ndarray, like: NBitsWeight, scales: np.ndarray, zeros: np.ndarray, zero_points) -> NBitsWeight:
    wt = np.asarray(w, np.float32).T
    n, k = wt.shape
    expand = np.repeat(np.arange(scales.shape[1]), like.block_size)[:k]
    q = np.rint(wt / scales[:, expand].astype(np.float32) + zeros[:, expand])
    q = np.clip(q, 0, 2 ** like.bits - 1).astype(np.uint8)
    return NBitsWeight(q, scales, zeros, like.block_size, like.bits, zero_points, like.scales_2d)


def stored_inputs(weight: NBitsWeight) -> dict[int, np.ndarray]:
    """The MatMulNBits inputs (1: B, 2: scales, 3: zero points when stored) for ``weight``."""
    n, k = weight.q.shape
    blocks = weight.scales.shape[1]
    full = np.zeros((n, blocks * weight.block_size), np.uint8)
    full[:, :k] = weight.q
    b = _pack(full, weight.bits).reshape(n, blocks, weight.block_size * weight.bits // 8)
    out = {1: b, 2: np.ascontiguousarray(weight.scales if weight.scales_2d else weight.scales.reshape(-1))}
    if weight.zero_points == np.uint8:
        out[3] = _pack(np.rint(weight.zeros).astype(np.uint8), weight.bits).reshape(-1)
    elif weight.zero_points is not None:
        out[3] = weight.zeros.astype(weight.zero_points).reshape(-1)
    return out


def take(weight: NBitsWeight, outputs: list[int] | None, inputs: list[int] | None) -> NBitsWeight:
    """The weight with only the output columns ``outputs`` and the input rows ``inputs`` (None: all). Whole
    quantisation blocks of inputs keep their grid exactly; otherwise the kept inputs are quantised afresh."""
    q, scales, zeros = weight.q, weight.scales, weight.zeros
    if outputs is not None:
        q, scales, zeros = q[outputs], scales[outputs], zeros[outputs]
    kept = NBitsWeight(q, scales, zeros, weight.block_size, weight.bits, weight.zero_points, weight.scales_2d)
    if inputs is None or len(inputs) == weight.k:
        return kept
    blocks = whole_blocks(inputs, weight.k, weight.block_size)
    if blocks is not None:
        return NBitsWeight(q[:, inputs], scales[:, blocks], zeros[:, blocks], weight.block_size, weight.bits,
                           weight.zero_points, weight.scales_2d)
    return quantize(kept.matrix()[inputs], kept)


def whole_blocks(inputs: list[int], k: int, block_size: int) -> list[int] | None:
    """The quantisation blocks ``inputs`` consists of, when it is whole blocks (the last may be short)."""
    keep = set(inputs)
    blocks = []
    for b in range(-(-k // block_size)):
        members = set(range(b * block_size, min((b + 1) * block_size, k)))
        if members <= keep:
            blocks.append(b)
        elif members & keep:
            return None
    return blocks
