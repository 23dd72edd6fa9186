"""The analysis' shape inference: ONNX's, refined by batch probes, then ONNX Runtime's symbolic inference on
the part still unknown only. Its answers must equal symbolic inference on the whole graph (what it did
before it was made fast for inspect, issue 16)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.analysis import shape_inference
from onnxprune.analysis.shape_inference import infer_shapes
from onnxprune.passes import NameNodesPass
from tests.graphs import make_model, weights


def _upsample_net():
    """Conv -> Resize(scales 2) -> Add with a stride-1 conv of the upsampled map: ONNX leaves the Resize's
    batch unknown (a symbolic batch times scale 1), which the batch probe fills."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Conv", ["x", "w2"], ["d"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["u", "d"], ["y"], name="add")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])],
                      [weights("w1", 4, 3, 3, 3, seed=1), weights("w2", 4, 3, 3, 3, seed=2), scales])


def _anchor_net():
    """A detector head's anchors: Shape -> Gather(H) -> Cast(float) -> Range -> Add 0.5 -> Mul with the
    features' mean: the Range's length is a value ONNX does not propagate, symbolic inference does."""
    consts = [numpy_helper.from_array(np.array(2, np.int64), "axis_h"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "axis_h"], ["h"], name="gather"),
             helper.make_node("Cast", ["h"], ["hf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Range", ["zero", "hf", "one"], ["r"], name="range"),
             helper.make_node("Add", ["r", "half"], ["a"], name="anchors"),
             helper.make_node("ReduceMean", ["c"], ["m"], name="mean", axes=[1, 3], keepdims=0),
             helper.make_node("Mul", ["m", "a"], ["y"], name="mul")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "h"])],
                      [weights("w1", 4, 3, 3, 3, seed=1)] + consts)


def _ir(proto):
    model = ir.serde.deserialize_model(proto)
    NameNodesPass()(model)
    return model


@pytest.mark.parametrize("build", [_upsample_net, _anchor_net])
def test_shapes_equal_symbolic_inference_on_the_whole_graph(build, monkeypatch):
    sizes = {"x": (1, 3, 16, 12)}
    model = _ir(build())
    fast, _, error, _ = infer_shapes(model, sizes)
    assert error is None

    # the reference: ORT's symbolic inference on the whole graph, no batch probe
    monkeypatch.setattr(shape_inference, "_fill_from_batch_probe", lambda inferred, proto: None)
    monkeypatch.setattr(shape_inference, "_unknown_part", lambda proto, inferred: proto)
    whole, _, _, _ = infer_shapes(model, sizes)
    for name in ("c", "u", "d", "y", "r", "a", "m"):
        if name in whole:
            assert fast[name] == whole[name], name


def test_batch_probe_sizes_a_resize_without_symbolic_inference(monkeypatch):
    def refuse(proto):
        raise AssertionError("symbolic inference ran although the batch probe sized everything")

    monkeypatch.setattr(shape_inference, "_symbolic_shapes", refuse)
    shapes, _, _, _ = infer_shapes(_ir(_upsample_net()), {"x": (1, 3, 16, 12)})
    assert shapes["u"] == ("N", 4, 16, 12)
    assert shapes["y"] == ("N", 4, 16, 12)


def test_anchor_chain_is_sized_at_the_given_input_size():
    shapes, _, _, _ = infer_shapes(_ir(_anchor_net()), {"x": (1, 3, 16, 12)})
    assert shapes["r"] == (16,)
    assert shapes["y"] == ("N", 16)
