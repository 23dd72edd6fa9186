"""A graph that fixes its batch (batch 1 is common in deployed models) is fed the batch it accepts by every
data-driven command, instead of failing in ONNX Runtime with "Got: 16 Expected: 1" (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from onnxprune.errors import InputError
from tests.graphs import make_model, weights


def _fixed_batch_cnn(path, batch: int):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
                       [weights("w1", 8, 3, 3, 3, seed=1), weights("w2", 4, 8, 1, 1, seed=3)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.standard_normal((10, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 10))
    return path


def test_batch_one_is_fed_one_sample_at_a_time(tmp_path, data):
    model = _fixed_batch_cnn(tmp_path / "b1.onnx", 1)
    result = api.evaluate(model, data, batch_size=16)
    assert result.samples == 10 and result.batch_size == 1 and "batches of 1" in result.preprocess
    scores = api.score(model, "sensitivity", data=data, grid=(0.5,))
    assert scores.options["samples"] == 10
    plan = api.allocate(model, method="uniform", granularity="channel", target_sparsity=0.3)
    out = api.apply(model, plan, tmp_path / "small.onnx", data=data)  # the refit runs the model on the data
    assert out.totals["refit"]["samples"] == 10


def test_a_fixed_batch_above_one_leaves_the_remainder_out_and_says_so(tmp_path, data):
    model = _fixed_batch_cnn(tmp_path / "b4.onnx", 4)
    result = api.evaluate(model, data)
    assert result.samples == 8 and result.batch_size == 4
    assert "the last 2 sample(s) left out" in result.preprocess


def test_too_few_samples_for_the_fixed_batch(tmp_path, data):
    model = _fixed_batch_cnn(tmp_path / "b4.onnx", 4)
    with pytest.raises(InputError, match="fixes the batch at 4"):
        api.evaluate(model, data, limit=3)


def test_a_loader_scripts_batches_are_regrouped_into_the_fixed_batch(tmp_path):
    model = _fixed_batch_cnn(tmp_path / "b4.onnx", 4)
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for n in (3, 5, 3):  # 11 samples in batches that are not 4\n"
        "        yield {'x': rng.standard_normal((n, 3, 8, 8)).astype(np.float32), 'labels': np.arange(n) % 4}\n")
    result = api.evaluate(model, data_loader_script=str(script))
    assert result.samples == 8 and result.batch_size == 4 and "batches of 4" in result.preprocess
    assert api.evaluate(model, data_loader_script=str(script), limit=6).samples == 4
    with pytest.raises(InputError, match="fix the batch at 4"):
        api.evaluate(model, data_loader_script=str(script), limit=3)
    scores = api.score(model, "sensitivity", data_loader_script=str(script), grid=(0.5,))
    assert scores.options["samples"] == 8
