"""Input shapes are a setting of every command (issue 16): ``--input-shape NAME:D0,D1,...`` or the data fix
the dynamic dimensions; FLOPs, FLOP budgets and the output check use them; scores and plans record them and
later steps reuse them; a number that needs an unknown size is refused, not computed at 1."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import api
from onnxprune.analysis.input_shapes import merge_data_shapes, parse_input_shapes
from onnxprune.errors import InputError
from onnxprune.verbs.loading import open_model
from tests.graphs import make_model, weights


def _dynamic_cnn(path, name: str = "images"):
    """Conv 3x3 without padding (needs H, W >= 3: a made-up size of 1 does not run) -> Relu -> Conv 1x1 ->
    GlobalAveragePool -> Flatten, with batch, height and width dynamic."""
    nodes = [helper.make_node("Conv", [name, "w1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    model = make_model(nodes, [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
                       [weights("w1", 8, 3, 3, 3, seed=1), weights("w2", 4, 8, 1, 1, seed=3)])
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def cnn(tmp_path):
    return _dynamic_cnn(tmp_path / "dyn.onnx")


def _flops_at(size: int) -> int:
    """conv1 (8x3x3x3 on a size x size input, no padding) and conv2 (4x8 on its output), 2 per MAC."""
    out = (size - 2) ** 2
    return 2 * out * (8 * 27 + 4 * 8)


def test_flops_are_counted_at_the_given_shape(cnn):
    assert api.inspect(cnn, input_shapes=["images:1,3,16,16"]).flops == _flops_at(16)
    assert api.inspect(cnn, input_shapes=["1,3,32,32"]).flops == _flops_at(32)  # one input: the name may go
    assert api.inspect(cnn, input_shapes={"images": (1, 3, 32, 32)}).to_dict()["input_shapes"] == {
        "images": [1, 3, 32, 32]}
    bare = api.inspect(cnn)
    assert bare.flops is None and any("dimensions 2 ('height'), 3 ('width') of input 'images'" in n
                                      for n in bare.notes)


@pytest.mark.parametrize("setting, message", [
    (["foo:1,3,8,8"], "names 'foo', which is not an input of the model"),
    (["images:1,3,8"], "gives 'images' 3 dimensions, the model declares 4"),
    (["images:1,4,8,8"], "sets dimension 1 to 4; the model fixes it at 3"),
    (["images:1,3,0,8"], "has a dimension below 1"),
    (["images:a,b"], "is not NAME:D0,D1,..."),
    (["images:1,3,8,8", "images:1,3,9,9"], "gives 'images' twice"),
])
def test_bad_settings_are_named(cnn, setting, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.inspect(cnn, input_shapes=setting)


def test_names_are_split_at_the_last_colon(tmp_path):
    """tf2onnx names end in ':0'."""
    path = _dynamic_cnn(tmp_path / "tf.onnx", name="input_1:0")
    model = open_model(path).model
    assert parse_input_shapes(["input_1:0:2,3,8,8"], model) == {"input_1:0": (2, 3, 8, 8)}


def test_a_shared_symbolic_dimension_is_fixed_everywhere():
    nodes = [helper.make_node("Add", ["ids", "mask"], ["y"], name="add")]
    proto = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "sequence"]),
                               helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])])
    am = open_model(onnx_ir_model(proto), input_shapes=["ids:1,128"])
    assert am.input_shapes == {"ids": (1, 128), "mask": (1, 128)} and am.unknown_dims == []
    with pytest.raises(InputError, match="no input name and the model has 2 inputs"):
        open_model(onnx_ir_model(proto), input_shapes=["1,128"])


def onnx_ir_model(proto: onnx.ModelProto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)


def test_a_flop_budget_needs_the_sizes_and_the_plan_records_them(cnn, tmp_path):
    with pytest.raises(InputError, match=r"FLOPs depend on the size of dimensions 2 \('height'\), 3 \('width'\) "
                                         r"of input 'images' \(--input-shape images:1,3,N,N, or --data\)"):
        api.allocate(cnn, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3)
    plan = api.allocate(cnn, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3,
                        input_shapes=["images:1,3,16,16"])
    assert plan.input_shapes == {"images": [1, 3, 16, 16]} and plan.totals["flops_before"] == _flops_at(16)
    api.write_json(plan.to_dict(), tmp_path / "plan.json")
    assert api.load_plan(tmp_path / "plan.json").input_shapes == {"images": [1, 3, 16, 16]}
    # apply reuses the plan's shapes: its output check runs the model at 16 x 16, where it runs
    result = api.apply(cnn, tmp_path / "plan.json", tmp_path / "out.onnx")
    assert result.totals["flops_before"] == _flops_at(16)
    written = onnx.load(str(tmp_path / "out.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in written] == ["batch", 3, "height", "width"]  # still dynamic


def test_the_output_check_asks_for_a_size_it_would_have_to_make_up(cnn, tmp_path):
    plan = api.allocate(cnn, method="uniform", target_sparsity=0.5)
    assert plan.totals["flops_sparsity"] is None  # not computed at 1
    with pytest.raises(InputError, match="the output check needs the size of dimensions 2 .* of input 'images'"):
        api.apply(cnn, plan, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    api.apply(cnn, plan, tmp_path / "out.onnx", input_shapes=["images:1,3,8,8"])


def test_the_data_fixes_the_sizes_and_a_contradiction_names_both(cnn, tmp_path):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((6, 3, 12, 12)).astype(np.float32), y=rng.integers(0, 4, 6))
    scores = api.score(cnn, "sensitivity", data=data, grid=(0.5,))
    assert scores.input_shapes == {"images": [1, 3, 12, 12]}
    plan = api.allocate(cnn, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3,
                        scores=scores)  # the scores' sizes
    assert plan.totals["flops_before"] == _flops_at(12)
    with pytest.raises(InputError, match=r"--input-shape images:1,3,16,16 contradicts the data, whose 'images' "
                                         r"samples are 3,12,12"):
        api.score(cnn, "sensitivity", data=data, grid=(0.5,), input_shapes=["images:1,3,16,16"])
    with pytest.raises(InputError, match="contradicts the data"):
        api.evaluate(cnn, data, input_shapes=["images:1,3,16,16"])
    assert api.evaluate(cnn, data, input_shapes=["images:4,3,12,12"]).samples == 6  # the batch may differ


def test_merge_keeps_a_given_batch():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c"])])
    model = onnx_ir_model(proto)
    assert merge_data_shapes({"x": (8, 5)}, {"x": (1, 5)}, model) == {"x": (8, 5)}


def test_named_dimensions_size_every_input_that_has_them(tmp_path):
    """--dim NAME=VALUE (issue 18): a decoder's KV-cache inputs share a few named dimensions; 0 is allowed (an
    empty cache); an unknown name or a size that is not a whole number is refused in one line."""
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 8]),
              helper.make_tensor_value_info("past.1.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 8])]
    nodes = [helper.make_node("Concat", ["past.0.key", "past.1.key"], ["both"], axis=2, name="cat")]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("both", TensorProto.FLOAT, ["batch_size", 2, "p2", 8])])
    path = tmp_path / "kv.onnx"
    path.write_bytes(model.SerializeToString())
    m = open_model(path).model
    shapes = parse_input_shapes(["sequence_length=16", "past_sequence_length=0"], m)
    assert shapes == {"ids": (1, 16), "past.0.key": (1, 2, 0, 8), "past.1.key": (1, 2, 0, 8)}
    assert parse_input_shapes(["past.0.key:1,2,4,8", "past_sequence_length=3"], m)["past.0.key"] == (1, 2, 4, 8)
    with pytest.raises(InputError, match="no input has a dimension named 'seq'"):
        parse_input_shapes(["seq=16"], m)
    with pytest.raises(InputError, match="whole number"):
        parse_input_shapes(["sequence_length=x"], m)
