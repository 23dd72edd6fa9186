"""tensors.masks (magnitude and N:M masks) and runtime.graph_io (weights as inputs, extra outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.runtime.graph_io import weights_as_inputs, with_outputs
from onnxprune.tensors.masks import apply_mask, magnitude_mask, magnitude_order, nm_mask, pruned_copy
from tests.graphs import make_model, tensor, weights
from tests.unit.nets import assert_n_of_m, run, sample, stable_mask


def tied(*shape, seed: int = 0) -> np.ndarray:
    """Small integers of both signs: many ties in |w|, including a w and -w pair."""
    return np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32)


@pytest.mark.parametrize("zeros", [0, 1, 7, 20, 47, 48, 60])
@pytest.mark.parametrize("make", [tied, sample], ids=["ties", "distinct"])
def test_magnitude_mask_is_the_stable_argsort(make, zeros):
    w = make(4, 12, seed=3)
    mask = magnitude_mask(w, zeros)
    assert mask.shape == w.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, stable_mask(w, zeros))
    assert int((~mask).sum()) == min(zeros, w.size)


@pytest.mark.parametrize("zeros", [0, 5, 23, 48])
def test_pruned_copy_agrees_with_magnitude_mask(zeros):
    w = tied(3, 16, seed=5)
    got = pruned_copy(w, magnitude_order(w), zeros)
    np.testing.assert_array_equal(got, apply_mask(w, magnitude_mask(w, zeros)))
    assert not np.shares_memory(got, w)
    assert np.count_nonzero(w) == np.count_nonzero(tied(3, 16, seed=5))  # the input is untouched


def test_apply_mask_keeps_dtype():
    w = sample(4, 4).astype(np.float16)
    out = apply_mask(w, magnitude_mask(w, 6))
    assert out.dtype == np.float16 and int((out == 0).sum()) == 6


@pytest.mark.parametrize("shape,axis", [((6, 8), 1), ((8, 3), 0), ((2, 4, 3, 3), 1)])
def test_nm_mask_keeps_the_n_largest_of_every_m(shape, axis):
    w = sample(*shape, seed=1)
    assert_n_of_m(nm_mask(w, 2, 4, axis), np.abs(w), axis)


def test_nm_mask_ties_go_to_the_first_and_odd_axes_are_refused():
    w = np.ones((1, 8), np.float32)
    np.testing.assert_array_equal(nm_mask(w, 2, 4, 1), [[1, 1, 0, 0, 1, 1, 0, 0]])
    assert nm_mask(np.ones((6, 6), np.float32), 2, 4, 1) is None


def weighted_model() -> onnx.ModelProto:
    """y = (x @ w) + c with w an initializer and c the output of a Constant node."""
    c = numpy_helper.from_array(sample(3, seed=2), "c")
    nodes = [helper.make_node("Constant", [], ["c"], value=c), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "c"], ["y"])]
    return make_model(nodes, [tensor("x", "N", 4)], [tensor("y", "N", 3)], [weights("w", 4, 3, seed=1)])


def test_weights_as_inputs_feeds_initializers_and_constants():
    proto = weighted_model()
    fed = weights_as_inputs(proto, ["w", "c", "not_a_weight"])
    assert [i.name for i in fed.graph.input] == ["x", "w", "c"]
    assert [i.type.tensor_type.shape.dim[0].dim_value for i in fed.graph.input[1:]] == [4, 3]
    assert not fed.graph.initializer and all(n.op_type != "Constant" for n in fed.graph.node)
    assert len(proto.graph.initializer) == 1  # the original is untouched
    x = sample(2, 4, seed=3)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    c = numpy_helper.to_array(proto.graph.node[0].attribute[0].t)
    (want,) = run(proto, {"x": x})
    np.testing.assert_allclose(run(fed, {"x": x, "w": w, "c": c})[0], want, rtol=1e-6)
    np.testing.assert_allclose(run(fed, {"x": x, "w": 2 * w, "c": 0 * c})[0], 2 * x @ w, rtol=1e-5)


def test_with_outputs_adds_each_value_once():
    proto = weighted_model()
    more = with_outputs(proto, ["h", "y", "h"])
    assert [o.name for o in more.graph.output] == ["y", "h"]
    assert [o.name for o in proto.graph.output] == ["y"]
    x = sample(2, 4, seed=4)
    y, h = run(more, {"x": x})
    np.testing.assert_allclose(h, x @ numpy_helper.to_array(proto.graph.initializer[0]), rtol=1e-5)
    np.testing.assert_allclose(y, run(proto, {"x": x})[0], rtol=1e-6)


def test_sparse_initializers_load_as_dense_weights(tmp_path):
    """A model with sparse initializers (linear and coordinate indices) loads with its weights in place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.io import load_model

    w = np.zeros((4, 3), np.float32)
    w[0, 1], w[2, 2], w[3, 0] = 1.5, -2.0, 0.5
    b = np.zeros(4, np.float32)
    b[1] = 3.0
    flat = np.flatnonzero(w)
    linear = helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[flat], "w"),
                                       numpy_helper.from_array(flat.astype(np.int64), ""), [4, 3])
    coords = helper.make_sparse_tensor(numpy_helper.from_array(np.array([3.0], np.float32), "b"),
                                       numpy_helper.from_array(np.array([[1]], np.int64), ""), [4])
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              sparse_initializer=[linear, coords])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "sparse.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    weights = {v.name: v.const_value.numpy() for v in loaded.graph.initializers.values()}
    np.testing.assert_array_equal(weights["w"], w)
    np.testing.assert_array_equal(weights["b"], b)


def test_operators_only_onnx_runtime_defines_load(tmp_path):
    """SimplifiedLayerNormalization in the default domain (ONNX Runtime GenAI's builder writes it): the
    checker does not know it, ONNX Runtime runs it, so the model loads; any other checker failure stands."""
    from onnx import TensorProto

    from onnxprune.errors import InputError
    from onnxprune.io import load_model

    def model(extra_attr: bool):
        nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5),
                 helper.make_node("Relu", ["y"], ["z"], **({"bogus": 3} if extra_attr else {}))]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
                                  [helper.make_tensor("g", TensorProto.FLOAT, [4], [1, 1, 1, 1])])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 9
        return proto

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(model(False), good)
    onnx.save(model(True), bad)
    assert [n.op_type for n in load_model(good).graph] == ["SimplifiedLayerNormalization", "Relu"]
    with pytest.raises(InputError, match="Unrecognized attribute: bogus"):
        load_model(bad)
