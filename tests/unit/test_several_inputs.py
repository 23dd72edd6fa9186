"""Models with several inputs (issue 17): each input fed from the .npz array of its name, a recurrent state
sliced along the axis that holds the batch, inputs that are not data (a sample rate) from the data whole or
from --input-value, and the same values for the output check and timing."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from onnxprune.errors import InputError
from onnxprune.io import load_model
from onnxprune.runtime.data import DataSpec
from onnxprune.runtime.feeding import batches
from onnxprune.runtime.session import create_session
from onnxprune.runtime.timing import random_feeds
from tests.graphs import make_model, weights
from tests.unit.nets import save


def _audio_net():
    """x (N, 8), state (2, N, 4), sr (int64 scalar) -> y = x @ W + sum(state over layers and features) + sr/1000."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("ReduceSum", ["state", "axes"], ["s"], name="sum_state", keepdims=0),
             helper.make_node("Unsqueeze", ["s", "one"], ["s1"], name="col"),
             helper.make_node("Cast", ["sr"], ["srf"], name="sr_float", to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "thousand"], ["khz"], name="khz"),
             helper.make_node("Add", ["h", "s1"], ["hs"], name="add_state"),
             helper.make_node("Add", ["hs", "khz"], ["y"], name="add_rate")]
    inits = [weights("w", 8, 3, seed=1), helper.make_tensor("axes", TensorProto.INT64, [2], [0, 2]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("thousand", TensorProto.FLOAT, [], [1000.0])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4]),
                              helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)


def _expected(x, state, sr):
    from onnx import numpy_helper

    w = numpy_helper.to_array(weights("w", 8, 3, seed=1))
    return x @ w + state.sum(axis=(0, 2))[:, None] + sr / 1000.0


@pytest.fixture()
def model(tmp_path):
    return save(_audio_net(), tmp_path / "audio.onnx")


def _arrays(n=10):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((2, n, 4)).astype(np.float32)


def test_every_input_from_its_array_the_state_along_its_batch_axis(model, tmp_path):
    x, state = _arrays()
    path = tmp_path / "data.npz"
    np.savez(path, x=x, state=state, sr=np.array(16000))
    ref = tmp_path / "ref.onnx"
    ref.write_bytes(model.read_bytes())
    result = api.evaluate(model, path, batch_size=4, reference=ref)  # batches of 4, 4, 2 samples
    assert result.samples == 10 and result.output_error == 0
    assert "state from the data" in result.preprocess and "sr from the data" in result.preprocess
    sess = create_session(str(model), "cpu")
    fed, _, _ = batches(load_model(model), sess, DataSpec.of(path, batch_size=4))
    got = np.concatenate([sess.run(feeds, None)[0] for feeds, _ in fed])
    np.testing.assert_allclose(got, _expected(x, state, 16000), rtol=1e-5, atol=1e-5)


def test_inputs_that_are_not_data_take_input_values(model, tmp_path):
    x, state = _arrays()
    path = tmp_path / "data.npz"
    np.savez(path, x=x, state=state)
    with pytest.raises(InputError, match="no array for the model's input\\(s\\) 'sr'.*--input-value"):
        api.evaluate(model, path)
    assert api.evaluate(model, path, input_values=["sr=8000"]).samples == 10
    np.savez(path, x=x)  # the state too: one value fills it at every batch
    assert api.evaluate(model, path, input_values=["sr=8000", "state=0"]).samples == 10
    with pytest.raises(InputError, match="no input of that name"):
        api.evaluate(model, path, input_values=["rate=8000", "state=0"])
    with pytest.raises(InputError, match="NAME=VALUE"):
        api.evaluate(model, path, input_values=["sr"])


def test_the_output_check_and_timing_use_the_values(model, tmp_path):
    sess = create_session(str(model), "cpu").session
    feeds = random_feeds(sess, batch=3, values={"sr": (16000.0,), "state": (0.5,)})
    assert feeds["sr"].dtype == np.int64 and feeds["sr"] == 16000 and feeds["state"].shape == (2, 3, 4)
    plan = api.allocate(model, method="uniform", target_sparsity=0.5)
    out = api.apply(model, plan, tmp_path / "p.onnx", input_values=["sr=16000", "state=0"])
    assert out.checked.endswith("ONNX Runtime run")
