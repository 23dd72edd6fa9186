"""The graph passes of onnxprune.passes on hand-built graphs, against independent oracles."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.errors import InputError
from onnxprune.passes import (
    NameNodesPass,
    ProvenancePass,
    RefitPass,
    RemoveBlocksPass,
    ShrinkChannelsPass,
    SparsifyPass,
    run_passes,
)
from onnxprune.passes.reconstruct import layer_rows
from onnxprune.planning.channel_selection import choose
from onnxprune.runtime.graph_io import with_outputs
from onnxprune.tensors.weights import get_weight, out_in_axes
from tests.graphs import initializers_to_constants, make_model, mask_channels, tensor
from tests.unit.nets import (
    analysed,
    assert_n_of_m,
    conv_chain,
    gemm_chain,
    initializer,
    layer,
    residual,
    run,
    sample,
    save,
    stable_mask,
    with_weights,
)

# ---------------------------------------------------------------- NameNodesPass

def test_name_nodes_names_unnamed_keeps_named_and_resolves_collisions():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="Relu_2"),
             helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["y"], name="mine")]
    model = ir.serde.deserialize_model(make_model(nodes, [tensor("x", 2)], [tensor("y", 2)]))
    assert NameNodesPass()(model).modified
    assert [n.name for n in model.graph] == ["Relu_0", "Relu_2", "Relu_2_", "mine"]
    again = NameNodesPass()(model)
    assert not again.modified
    assert [n.name for n in model.graph] == ["Relu_0", "Relu_2", "Relu_2_", "mine"]


def test_name_nodes_ensures_every_node_named():
    model = ir.serde.deserialize_model(conv_chain())
    with pytest.raises(ir.passes.PostconditionError):
        NameNodesPass().ensures(model)  # the Relus and the head are unnamed before the pass
    NameNodesPass()(model)
    NameNodesPass().ensures(model)


# ---------------------------------------------------------------- SparsifyPass

def tied_chain() -> onnx.ModelProto:
    """conv_chain with c1's weight made of small integers (many ties in |w|)."""
    return with_weights(conv_chain(), {"w1": np.random.default_rng(0).integers(-2, 3, (8, 3, 3, 3))})


@pytest.mark.parametrize("storage", ["initializers", "constants"])
def test_sparsify_zeros_exactly_the_smallest(tmp_path, storage):
    path = save(tied_chain(), tmp_path / "m.onnx")
    if storage == "constants":
        path = initializers_to_constants(path, tmp_path / "c.onnx")
    am = analysed(onnx.load(str(path)))
    before = {lay.name: np.array(get_weight(lay)) for lay in am.layers}
    targets = {"c1": 100, "c2": 77, "fc": 0}
    sp = SparsifyPass(am.layers, targets)
    assert sp(am.model).modified
    assert sp.report.zeros == targets
    assert sp.report.sizes == {name: w.size for name, w in before.items()}
    for lay in am.layers:
        want = before[lay.name] * stable_mask(before[lay.name], targets[lay.name])
        np.testing.assert_array_equal(get_weight(lay), want)


def test_sparsify_with_no_zeros_changes_nothing():
    am = analysed(conv_chain())
    assert not SparsifyPass(am.layers, {"c1": 0, "c2": 0})(am.model).modified


def test_sparsify_nm_keeps_two_of_every_four_along_the_input_axis():
    am = analysed(gemm_chain())
    before = {lay.name: np.array(get_weight(lay)) for lay in am.layers}
    sp = SparsifyPass(am.layers, {"g1": 1, "m2": 1}, nm=(2, 4))
    sp(am.model)
    assert not sp.report.skipped
    for lay in am.layers:
        w, in_axis = np.array(get_weight(lay)), out_in_axes(lay)[1]
        assert in_axis == {"g1": 1, "m2": 0}[lay.name]
        assert_n_of_m(w != 0, np.abs(before[lay.name]), in_axis)
        assert sp.report.zeros[lay.name] == w.size // 2


def test_sparsify_nm_skips_a_layer_whose_input_is_not_a_multiple_of_m():
    am = analysed(gemm_chain(features=6))
    g1 = layer(am, "g1")
    before = np.array(get_weight(g1))
    sp = SparsifyPass(am.layers, {"g1": 1, "m2": 1}, nm=(2, 4))
    sp(am.model)
    assert set(sp.report.skipped) == {"g1"}
    assert "6" in sp.report.skipped["g1"] and "4" in sp.report.skipped["g1"]
    assert sp.report.zeros == {"g1": 0, "m2": layer(am, "m2").params // 2}
    np.testing.assert_array_equal(get_weight(g1), before)


def test_sparsify_ensures_checks_the_counts():
    am = analysed(conv_chain())
    sp = SparsifyPass(am.layers, {"c1": 10, "c2": 20})
    sp(am.model)
    sp.ensures(am.model)
    sp.targets["c2"] = 21
    with pytest.raises(ir.passes.PostconditionError):
        sp.ensures(am.model)


# ---------------------------------------------------------------- RemoveBlocksPass

def zero_branch(proto: onnx.ModelProto, block: int) -> onnx.ModelProto:
    """Oracle: the block's last conv (no bias) with a zero weight, so its Add passes the skip value on."""
    return with_weights(proto, {f"wb{block}": 0 * initializer(proto, f"wb{block}")})


@pytest.mark.parametrize("blocks,with_head,remove", [(1, False, 0), (2, True, 0), (2, True, 1)])
def test_remove_blocks_leaves_the_skip(blocks, with_head, remove):
    proto = residual(blocks, with_head=with_head)
    am = analysed(proto)
    block = am.blocks[remove]
    assert block.name == f"add{remove}" and block.removable
    result = run_passes(am.model, [RemoveBlocksPass([block])])
    assert result.modified
    names = {n.name for n in am.model.graph}
    assert not names & {f"add{remove}", f"r{remove}a", f"r{remove}b"}
    assert not set(am.model.graph.initializers) & {f"wa{remove}", f"wb{remove}"}
    assert [o.name for o in am.model.graph.outputs] == [o.name for o in proto.graph.output]
    x = sample(2, 4, 6, 6)
    got = run(am.model, {"x": x})[0]
    np.testing.assert_allclose(got, run(zero_branch(proto, remove), {"x": x})[0], rtol=1e-5, atol=1e-6)
    if not with_head:
        np.testing.assert_array_equal(got, x)


def test_remove_blocks_refuses_a_block_that_is_not_removable():
    proto = residual(1, with_head=False)
    proto.graph.output.append(tensor("ra0", "N", 4, 6, 6))  # the branch is read outside the block
    (block,) = analysed(proto).blocks
    assert not block.removable
    with pytest.raises(InputError, match="add0"):
        RemoveBlocksPass([block])


def test_run_passes_lets_an_input_error_through():
    am = analysed(residual(1))
    gone = dataclasses.replace(am.blocks[0], name="no_such_add")
    with pytest.raises(InputError, match="no_such_add"):
        run_passes(am.model, [RemoveBlocksPass([gone])])


def test_run_passes_wraps_other_errors():
    class Broken(ir.passes.InPlacePass):
        def call(self, model):
            raise ValueError("broken")

    with pytest.raises(ir.passes.PassError) as err:
        run_passes(analysed(residual(1)).model, [Broken()])
    assert not isinstance(err.value, InputError)


# ---------------------------------------------------------------- ShrinkChannelsPass

def test_shrink_removes_the_chosen_channels():
    proto = conv_chain()
    am = analysed(proto)
    cg = am.channel_graph()
    remove, choices = choose(cg, {"c1": 0.5, "c2": 1 / 3})
    assert [(c.layers, c.channels, c.removed) for c in choices] == [(["c1"], 8, 4), (["c2"], 6, 2)]
    kept1, kept2 = (cg.kept(cg.produced[name], remove) for name in ("c1", "c2"))
    shrink = ShrinkChannelsPass(cg, remove)
    run_passes(am.model, [shrink, RemoveUnusedNodesPass()])
    assert shrink.edits > 0
    assert shrink.channels_after == {"c1": 4, "c2": 4, "fc": 5}
    shapes = {name: tuple(v.const_value.shape) for name, v in am.model.graph.initializers.items()}
    assert sorted(shapes.values()) == sorted([(4, 3, 3, 3), (4,), (4, 4, 3, 3), (4,), (5, 4), (5,)])
    assert "w1" not in shapes and "w2" not in shapes  # the unshrunk originals are dropped
    masks = {"r1": (4, 1, np.isin(np.arange(8), kept1)), "r2": (4, 1, np.isin(np.arange(6), kept2))}
    x = sample(3, 3, 8, 8)
    np.testing.assert_allclose(run(am.model, {"x": x})[0], run(mask_channels(proto, masks), {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_shrink_ensures_checks_the_planned_channels():
    am = analysed(conv_chain())
    cg = am.channel_graph()
    shrink = ShrinkChannelsPass(cg, choose(cg, {"c1": 0.5})[0])
    shrink(am.model)
    shrink.channels_after["c1"] = 5
    with pytest.raises(ir.passes.PostconditionError, match="c1"):
        shrink.ensures(am.model)


# ---------------------------------------------------------------- RefitPass

def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Squared error over the per-batch variance of ``want``, channels last (as the refit reports it)."""
    def rows(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])

    err = sum(((rows(g) - rows(w)) ** 2).sum() for g, w in zip(got, want, strict=True))
    return float(err / sum(((rows(w) - rows(w).mean(0)) ** 2).sum() for w in want))


@pytest.mark.parametrize("proto,shape,consumer,value", [
    (conv_chain(with_head=False), (3, 8, 8), "c2", "h2"),
    (gemm_chain(), (16,), "m2", "logits"),
], ids=["conv", "gemm"])
def test_refit_lowers_the_consumer_error(proto, shape, consumer, value):
    am = analysed(proto)
    cg = am.channel_graph()
    producer = next(iter(cg.produced))
    remove, _ = choose(cg, {producer: 0.5})
    batches = [{"x": sample(8, *shape, seed=s)} for s in (1, 2)]
    refit = RefitPass(cg, remove, batches)
    plain = analysed(proto)
    plain_cg = plain.channel_graph()
    run_passes(am.model, [refit, ShrinkChannelsPass(cg, remove), RemoveUnusedNodesPass()])
    run_passes(plain.model, [ShrinkChannelsPass(plain_cg, choose(plain_cg, {producer: 0.5})[0])])
    report = refit.report
    assert report.refit == [consumer] and not report.skipped and report.samples == 16
    assert 0 <= report.error_after[consumer] < report.error_before[consumer]
    def outputs(model) -> np.ndarray:
        proto_ = with_outputs(model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model),
                              [value])
        return [run(proto_, b, [value])[0] for b in batches]

    want = outputs(proto)
    after, before = relative_error(outputs(am.model), want), relative_error(outputs(plain.model), want)
    assert after < before
    assert after == pytest.approx(report.error_after[consumer], rel=1e-3)
    assert before == pytest.approx(report.error_before[consumer], rel=1e-3)


def test_layer_rows_are_the_im2col_of_a_dilated_strided_convolution():
    proto = conv_chain(with_head=False)
    c2 = next(n for n in proto.graph.node if n.name == "c2")
    c2.attribute.extend([helper.make_attribute("dilations", [2, 2]), helper.make_attribute("strides", [2, 1])])
    am = analysed(proto)
    c2_layer = layer(am, "c2")
    x = sample(2, 3, 8, 8, seed=4)
    a_in, y = run(with_outputs(proto, ["r1", "h2"]), {"x": x}, ["r1", "h2"])
    w = np.asarray(get_weight(c2_layer))
    bias = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "b2")
    got = layer_rows(a_in, c2_layer) @ w.reshape(len(w), -1).T + bias
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]), rtol=1e-4, atol=1e-5)
    cg = am.channel_graph()
    refit = RefitPass(cg, choose(cg, {"c1": 0.5})[0], [{"x": sample(16, 3, 8, 8)}])
    assert refit(am.model).modified and refit.report.refit == ["c2"]
    assert refit.report.error_after["c2"] < refit.report.error_before["c2"]


# ---------------------------------------------------------------- ProvenancePass

@pytest.mark.parametrize("earlier,keep,previous", [
    (None, True, None),
    ('{"step": 1}', True, {"step": 1}),
    ('{"step": 1}', False, None),
    ("not json", True, "not json"),
])
def test_provenance_records_and_keeps_the_previous(earlier, keep, previous):
    model = analysed(gemm_chain()).model
    if earlier is not None:
        model.metadata_props["onnxprune.k"] = earlier
    assert ProvenancePass("onnxprune.k", {"step": 2, "a": [1]}, keep_previous=keep)(model).modified
    record = json.loads(model.metadata_props["onnxprune.k"])
    assert record.pop("previous", None) == previous
    assert record == {"step": 2, "a": [1]}
