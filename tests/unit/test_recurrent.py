"""LSTM, GRU and RNN weights as prunable layers (issue 17): each recurrent node gives two layers, NODE.W (input
weights) and NODE.R (recurrent weights), pruned unstructured and N:M along their input axis, scored by weight
and by data; the channel analysis leaves what feeds them whole."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from tests.graphs import make_model, weights
from tests.unit.nets import analysed, assert_n_of_m, initializer, run, save, write_npz

HIDDEN, FEATURES, STEPS = 8, 12, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent_net(op: str, directions: int = 1):
    """x (N, STEPS, FEATURES) -> Transpose to (STEPS, N, FEATURES) -> OP -> last step -> Gemm fc to 5 classes."""
    g = GATES[op] * HIDDEN
    direction = "bidirectional" if directions == 2 else "forward"
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="to_steps", perm=[1, 0, 2]),
             helper.make_node(op, ["xt", "W", "R", "B"], ["y"], name="rnn", hidden_size=HIDDEN, direction=direction),
             helper.make_node("Gather", ["y", "last"], ["y_last"], name="last_step", axis=0),  # (dirs, N, H)
             helper.make_node("Transpose", ["y_last"], ["y_t"], name="to_batch", perm=[1, 0, 2]),
             helper.make_node("Flatten", ["y_t"], ["h"], name="flat"),
             helper.make_node("Gemm", ["h", "wf", "bf"], ["logits"], name="fc", transB=1)]
    last = helper.make_tensor("last", TensorProto.INT64, [], [STEPS - 1])
    inits = [weights("W", directions, g, FEATURES, seed=1, scale=0.4), weights("R", directions, g, HIDDEN, seed=2,
                                                                               scale=0.4),
             weights("B", directions, 2 * g, seed=3, scale=0.1), weights("wf", 5, directions * HIDDEN, seed=4),
             weights("bf", 5, seed=5), last]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, FEATURES])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)


@pytest.mark.parametrize("op,directions", [("LSTM", 2), ("GRU", 1), ("RNN", 1)])
def test_recurrent_weights_are_two_layers_with_flops(op, directions):
    am = analysed(_recurrent_net(op, directions))
    layers = {layer.name: layer for layer in am.layers}
    assert set(layers) == {"rnn.W", "rnn.R", "fc"}
    g = GATES[op] * HIDDEN
    assert layers["rnn.W"].weight_shape == (directions, g, FEATURES)
    assert layers["rnn.W"].flops == 2 * STEPS * directions * g * FEATURES
    assert layers["rnn.R"].flops == 2 * STEPS * directions * g * HIDDEN
    assert layers["rnn.W"].params == directions * g * FEATURES + directions * 2 * g  # the bias counted with W
    assert am.params == sum(layer.params for layer in am.layers)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_layers_prune_unstructured_and_n_of_m(op, tmp_path):
    path = save(_recurrent_net(op, 2 if op == "LSTM" else 1), tmp_path / "rnn.onnx")
    data = write_npz(tmp_path / "data.npz", 32, STEPS, FEATURES)
    scores = api.score(path, "sensitivity", data=data, grid=(0.5, 0.9))
    assert {u["name"] for u in scores.units} == {"rnn.W", "rnn.R", "fc"}
    plan = api.allocate(path, method="sensitivity", scores=scores, target_sparsity=0.5)
    res = api.apply(path, plan, tmp_path / "sparse.onnx")
    pruned = onnx.load(str(res.path))
    planned = {entry["name"]: entry["zeros"] for entry in plan.layers}
    for name in ("W", "R"):
        assert np.count_nonzero(initializer(pruned, name) == 0) == planned[f"rnn.{name}"] > 0
    nm = api.apply(path, plan, tmp_path / "nm.onnx", granularity="n:m")
    nm_proto = onnx.load(str(nm.path))
    for name in ("W", "R"):
        keep = initializer(nm_proto, name) != 0
        assert_n_of_m(keep, np.abs(initializer(_recurrent_net(op, 2 if op == "LSTM" else 1), name)), axis=2)
    x = np.random.default_rng(0).standard_normal((3, STEPS, FEATURES)).astype(np.float32)
    assert run(nm_proto, {"x": x})[0].shape == (3, 5)
    sr = api.score(path, "srinit", data=data, units="layers")
    assert {u["name"] for u in sr.units} == {"rnn.W", "rnn.R", "fc"}


def test_channels_feeding_a_recurrent_layer_stay_whole(tmp_path):
    am = analysed(_recurrent_net("LSTM"))
    groups = am.channel_graph().describe()
    assert not any(g["prunable"] and any(name.startswith("rnn") for name in g["layers"]) for g in groups)
