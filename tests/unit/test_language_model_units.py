"""Small pieces of the decoder-LM support, without a model: cache renumbering, int4 packing, next-token
metrics."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.passes.remove_blocks import renumbered
from onnxprune.runtime.language_model import TokenReference, next_token_nll
from onnxprune.tensors.nbits import NBitsWeight, _pack, _unpack, on_grid, quantize, take, whole_blocks


def test_cache_names_numbered_from_zero_are_renumbered_contiguous():
    before = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")] + ["input_ids"]
    after = [n for n in before if ".1." not in n]
    mapping = renumbered(before, after)
    assert mapping == {"past_key_values.2.key": "past_key_values.1.key",
                       "past_key_values.2.value": "past_key_values.1.value",
                       "past_key_values.3.key": "past_key_values.2.key",
                       "past_key_values.3.value": "past_key_values.2.value"}


def test_names_not_numbered_from_zero_keep_their_numbers():
    before = ["out.3", "out.5", "out.7"]  # not a 0..n-1 template: not the runtime's layer index
    assert renumbered(before, ["out.3", "out.7"]) == {}


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trips(bits):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2 ** bits, (5, 64)).astype(np.uint8)
    assert np.array_equal(_unpack(_pack(q, bits), bits, 64), q)


def _weight(k=64, n=8, block=32) -> tuple[np.ndarray, NBitsWeight]:
    rng = np.random.default_rng(1)
    like = NBitsWeight(np.zeros((n, k), np.uint8), np.ones((n, k // block), np.float32),
                       np.full((n, k // block), 8, np.float32), block, 4, None, True)
    w = quantize(rng.standard_normal((k, n)).astype(np.float32), like)
    return w.matrix(), w


def test_values_on_the_grid_encode_exactly():
    matrix, weight = _weight()
    assert np.array_equal(on_grid(matrix, weight).q, weight.q)
    zeroed = matrix.copy()
    zeroed[::3] = 0
    assert np.array_equal(on_grid(zeroed, weight).matrix(), zeroed)  # zeros are on every grid


def test_whole_input_blocks_keep_their_grid_partial_ones_requantise():
    matrix, weight = _weight()
    assert whole_blocks(list(range(32, 64)), 64, 32) == [1]
    assert whole_blocks(list(range(0, 40)), 64, 32) is None
    exact = take(weight, [0, 2, 5], list(range(32, 64)))
    assert np.array_equal(exact.matrix(), matrix[32:, [0, 2, 5]])
    partial = take(weight, None, list(range(0, 64, 2)))
    assert np.abs(partial.matrix() - matrix[::2]).max() <= partial.scales.max() / 2 + 1e-6


def test_next_token_metrics():
    logits = np.log(np.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    ids = np.array([[0, 0, 1]])
    assert next_token_nll(logits, ids)[0] == pytest.approx(-np.log(0.5) - np.log(0.1))  # position t predicts t + 1
    reference = TokenReference(logits)
    assert reference.kl(logits)[0] == 0.0 and reference.disagreement(logits)[0] == 0.0
    other = np.log(np.array([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]))
    kl = [0.0, 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5), 0.2 * np.log(0.2 / 0.5) + 0.8 * np.log(0.8 / 0.5)]
    assert reference.kl(other)[0] == pytest.approx(np.mean(kl), rel=1e-12)  # by definition, per position
    assert reference.disagreement(logits[:, :, ::-1])[0] == pytest.approx(2 / 3)  # ties go to the first
    rng = np.random.default_rng(0)
    ref, new = rng.standard_normal((2, 3, 37, 50), dtype=np.float32)
    one, split = TokenReference(ref), TokenReference(ref, threads=4)  # by positions in threads: the same bits
    assert np.array_equal(one.kl(new), split.kl(new)) and np.array_equal(one.disagreement(new), split.disagreement(new))
