"""Block removal (SR-init's rule) and re-initialisation scores, against independent oracles."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import TopologicalSortPass

import onnxprune
from onnxprune import api
from onnxprune.artefacts import Plan, write_json
from onnxprune.errors import InputError

SR_INIT_RESNET56_BLOCKS = [1, 8, 17, 19, 21, 22, 23, 24, 25, 26]  # the reference's 10 removed blocks (0-based)


def zero_branches(path, blocks) -> bytes:
    """Oracle model: the original with each removed branch's output multiplied by 0 at its Add."""
    q = onnx.load(str(path))
    for blk in blocks:
        add = next(n for n in q.graph.node if n.name == blk.name)
        zeroed = add.input[blk.branch_input] + "_zeroed"
        q.graph.node.append(onnx.helper.make_node("Mul", [add.input[blk.branch_input], "zero_scalar"], [zeroed]))
        add.input[blk.branch_input] = zeroed
    q.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero_scalar"))
    m = ir.serde.deserialize_model(q)
    TopologicalSortPass()(m)
    return ir.serde.serialize_model(m).SerializeToString()


def block_plan(path, names) -> Plan:
    info = onnxprune.inspect(path)
    chosen = [b for b in info.blocks if b.name in names]
    return Plan(method="manual", fingerprint=info.fingerprint, layers=[],
                blocks=[{"name": b.name, "layers": b.layers} for b in chosen], totals={}, granularity="blocks")


@pytest.mark.parametrize("name", ["resnet-proj", "transformer-pre", "transformer-post"])
def test_removal_equals_zeroed_branch(export, digits_npz, tmp_path, name):
    path = export(name)
    info = onnxprune.inspect(path)
    chosen = [info.blocks[0], info.blocks[-1]]
    out = api.apply(path, block_plan(path, [b.name for b in chosen]), tmp_path / "removed.onnx")
    x = np.load(digits_npz)["x"][:64].astype(np.float32) / 255
    got = ort.InferenceSession(str(out.path)).run(None, {"input": x})[0]
    ref = ort.InferenceSession(zero_branches(path, chosen)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    after = onnxprune.inspect(out.path)
    assert len(after.blocks) == len(info.blocks) - 2
    assert after.params == info.params - sum(b.params for b in chosen)


def test_sr_init_reference_blocks_on_resnet56(export, cifar_lossless, tmp_path):
    """The SR-init paper's ResNet-56 removal: 853,018 -> 307,226 parameters (63.98 % fewer) with BN kept."""
    path = export("resnet56", keep_bn=True)
    info = onnxprune.inspect(path)
    names = [info.blocks[i].name for i in SR_INIT_RESNET56_BLOCKS]
    out = api.apply(path, block_plan(path, names), tmp_path / "sr.onnx")
    assert out.totals["params_before"] == 853_018
    assert out.totals["params_after"] == 307_226
    assert round(100 * out.totals["params_fraction_removed"], 2) == 63.98
    assert len(onnxprune.inspect(out.path).blocks) == 17
    x = np.load(cifar_lossless)["x"][:32].astype(np.float32) / 255
    got = ort.InferenceSession(str(out.path)).run(None, {"input": x})[0]
    ref = ort.InferenceSession(zero_branches(path, [info.blocks[i] for i in SR_INIT_RESNET56_BLOCKS])).run(
        None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("units,max_memory", [("blocks", None), ("layers", None), ("blocks", 3 << 20)])
def test_srinit_scores_equal_naive_full_runs(export, digits_npz, units, max_memory):
    """Partial-graph SR-init drops equal those of full runs of the model with the unit re-initialised, also
    when the memory bound splits the suffix sessions into groups (one pass of the data per group)."""
    from onnxprune.analysis.graph import analyse_graph
    from onnxprune.scoring.srinit import fresh_init

    path = export("resnet-proj")
    sc = api.score(path, "srinit", data=digits_npz, metric="top1", seed=1, units=units, max_memory=max_memory,
                   batch_size=256)
    assert (sc.options["passes"] == 1) == (max_memory is None)
    d = np.load(digits_npz)
    x, y = d["x"].astype(np.float32) / 255, d["y"]
    base = np.mean(ort.InferenceSession(str(path)).run(None, {"input": x})[0].argmax(1) == y) * 100
    model = ir.load(path)
    info = analyse_graph(model)
    layers = {layer.name: layer for layer in onnxprune.api.find_layers(info)}
    all_block_layers = [layers[n] for b in onnxprune.inspect(path).blocks for n in b.layers]
    unit_layers = all_block_layers if units == "blocks" else list(layers.values())
    init = fresh_init(unit_layers, {n.name: n for n in info.graph}, seed=1)
    proto = onnx.load(str(path))
    for unit in sc.units:
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        for t in p.graph.initializer:
            own = unit["layers"] if units == "blocks" else [unit["name"]]
            names = {k for n in own for k in (layers[n].weight, layers[n].bias) if k}
            if t.name in names:
                t.CopyFrom(onnx.numpy_helper.from_array(init[t.name], t.name))
        top1 = np.mean(ort.InferenceSession(p.SerializeToString()).run(None, {"input": x})[0].argmax(1) == y) * 100
        assert unit["drop"] == pytest.approx(base - top1, abs=1e-6), unit["name"]
        assert unit["drop_se"] > 0


def test_srinit_allocation_rules(export, digits_npz):
    path = export("resnet-proj")
    sc = api.score(path, "srinit", data=digits_npz, seeds=2)
    assert all("top1_seed_std" in u["metrics"] for u in sc.units)
    one = api.allocate(path, method="srinit", scores=sc, remove=1)
    identity = [u for u in sc.units if u["skip"] == "identity"]
    assert [b["name"] for b in one.blocks] == [min(identity, key=lambda u: u["drop"])["name"]]
    none = api.allocate(path, method="srinit", scores=sc, threshold=-1.0)
    assert none.blocks == []
    # the projection (downsampling) block is never chosen
    every = api.allocate(path, method="srinit", scores=sc, remove=len(identity))
    assert all(b["name"] != sc.units[1]["name"] for b in every.blocks)
    with pytest.raises(InputError, match="exactly one of"):
        api.allocate(path, method="srinit", scores=sc, remove=1, threshold=0.5)
    with pytest.raises(InputError, match="there are 2 removable blocks"):
        api.allocate(path, method="srinit", scores=sc, remove=3)
    target = api.allocate(path, method="srinit", scores=sc, target_params=0.3)
    assert target.totals["params_fraction"] >= 0.3


def test_block_plan_for_wrong_model_refused(export, tmp_path):
    plan = block_plan(export("transformer-pre"), [onnxprune.inspect(export("transformer-pre")).blocks[0].name])
    path = write_json(plan.to_dict(), tmp_path / "plan.json")
    with pytest.raises(InputError, match="made for another model"):
        api.apply(export("transformer-post"), path, tmp_path / "out.onnx")


def test_srinit_label_free_and_bad_data(export, digits_npz, tmp_path):
    path = export("resnet-proj")
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.load(digits_npz)["x"][:100])
    for metric in ("agreement", "kl"):
        sc = api.score(path, "srinit", data=unlabelled, metric=metric)
        assert all(u["drop"] >= 0 and "top1" not in sc.options["reference"] for u in sc.units)
    with pytest.raises(InputError, match="needs labels"):
        api.score(path, "srinit", data=unlabelled, metric="top1")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 3, 8, 8), np.uint8), y=np.zeros(10))
    with pytest.raises(InputError, match="does not match model input"):
        api.score(path, "srinit", data=bad)
    np.savez(bad, x=np.zeros((10, 1, 8, 8), np.uint8), y=np.zeros(4))
    with pytest.raises(InputError, match="4 labels"):
        api.score(path, "srinit", data=bad)
    with pytest.raises(InputError, match="over --max-memory"):
        api.score(path, "srinit", data=digits_npz, max_memory=1000)


def test_reinit_touches_exactly_the_units_weights(export):
    """The fresh values cover every weight, bias (and BN parameter) of the unit's layers and nothing else, and
    have the Kaiming-normal scale."""
    from onnxprune.analysis.graph import analyse_graph
    from onnxprune.analysis.layers import find_layers
    from onnxprune.scoring.srinit import _param_names, fresh_init

    for name, keep_bn in (("resnet56", True), ("resnet-proj", False)):
        path = export(name, keep_bn=keep_bn) if keep_bn else export(name)
        model = ir.load(path)
        info = analyse_graph(model)
        nodes = {n.name: n for n in info.graph}
        layers = {layer.name: layer for layer in find_layers(info)}
        block = onnxprune.inspect(path).blocks[1]
        unit_layers = [layers[n] for n in block.layers]
        init = fresh_init(unit_layers, nodes, seed=1)
        expected = {k for layer in unit_layers for k in _param_names(layer, nodes)}
        assert set(init) == expected
        for layer in unit_layers:
            w = init[layer.weight]
            fan_in = int(np.prod(w.shape[1:]))
            assert np.std(w) == pytest.approx(np.sqrt(2 / fan_in), rel=0.1)
            if layer.bn:
                scale, bias, mean, var = (init[v.name] for v in nodes[layer.bn].inputs[1:5])
                assert np.all(scale == 1) and np.all(bias == 0) and np.all(mean == 0) and np.all(var == 1)


def test_reinit_resets_the_layernorm_inside_a_transformer_block(export):
    """A pre-norm transformer block holds its LayerNorm: fresh means scale 1, shift 0 (as a new model), and
    nothing outside the block's nodes is touched."""
    from onnxprune.analysis.graph import analyse_graph
    from onnxprune.scoring.srinit import fresh_norms

    path = export("transformer-pre")
    info = analyse_graph(ir.load(path))
    nodes = {n.name: n for n in info.graph}
    block = onnxprune.inspect(path).blocks[0]
    fresh = fresh_norms(nodes[n] for n in block.nodes)
    norm = next(nodes[n] for n in block.nodes if nodes[n].op_type == "LayerNormalization")
    assert set(fresh) == {norm.inputs[1].name, norm.inputs[2].name}
    assert np.all(fresh[norm.inputs[1].name] == 1) and np.all(fresh[norm.inputs[2].name] == 0)
    assert not np.all(norm.inputs[1].const_value.numpy() == 1)  # the trained scale really changes
