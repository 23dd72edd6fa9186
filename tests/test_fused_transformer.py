"""all-MiniLM-L6-v2 after ONNX Runtime's transformer optimizer (issue 18): each residual Add + LayerNorm
fused into SkipLayerNormalization, the MLP's bias + Gelu into BiasGelu. The same blocks, FLOPs and layers are
found as on the plain torch export, and removing the same blocks (by position) from both gives the same
outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxprune import api
from onnxprune.passes import RemoveBlocksPass
from onnxprune.verbs.loading import open_model

SHAPE = ["input_ids:1,16"]


@pytest.fixture(scope="module")
def fused(minilm, tmp_path_factory):
    from onnxruntime.transformers import optimizer

    path = tmp_path_factory.mktemp("fused") / "minilm_fused.onnx"
    optimizer.optimize_model(str(minilm), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(
        str(path))
    return path


def test_fused_graph_has_the_same_blocks_and_flops(minilm, fused):
    plain, opt = api.inspect(minilm, input_shapes=SHAPE), api.inspect(fused, input_shapes=SHAPE)
    assert {n.op_type for n in ir.load(fused).graph} >= {"SkipLayerNormalization", "BiasGelu"}
    assert len(opt.blocks) == len(plain.blocks) == 12 and all(b.removable for b in opt.blocks)
    assert [(b.params, b.flops, len(b.layers)) for b in opt.blocks] == [
        (b.params, b.flops, len(b.layers)) for b in plain.blocks]
    assert opt.flops == plain.flops and opt.params == plain.params


def _without(path, positions):
    am = open_model(path, input_shapes=SHAPE)
    RemoveBlocksPass([am.blocks[i] for i in positions])(am.model)
    return ort.InferenceSession(ir.serde.serialize_model(am.model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("positions", [[], [1], [0, 5], [11], [2, 3, 10]])
def test_removing_the_same_blocks_gives_the_same_outputs(minilm, fused, positions):
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    a = _without(minilm, positions).run(None, feeds)[0]
    b = _without(fused, positions).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_block_plans_apply_to_the_fused_graph(fused, tmp_path):
    data = tmp_path / "tokens.npz"
    rng = np.random.default_rng(1)
    np.savez(data, input_ids=rng.integers(0, 1000, (16, 16)).astype(np.int64),
             attention_mask=np.ones((16, 16), np.int64))
    for method in ("srinit", "influence"):  # re-initialisation, and ShortGPT's block influence (one run)
        scores = api.score(fused, method, data=data, units="blocks")
        assert len(scores.units) == 12 and all(u["drop"] is not None for u in scores.units)
        plan = api.allocate(fused, method="srinit", scores=scores, remove=2)
        out = api.apply(fused, plan, tmp_path / f"pruned_{method}.onnx")
        assert len(api.inspect(out.path, input_shapes=SHAPE).blocks) == 10


def test_heads_and_mlp_width_prune_the_same_on_the_fused_graph(minilm, fused, tmp_path):
    """BiasGelu passes the MLP's channels on (its bias shrinks with them, and counts as the MatMul's bias):
    the same channel groups, the same uniform plan, and the same outputs after applying it."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (2, 16)).astype(np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    outputs, plans = [], []
    for path in (minilm, fused):
        plan = api.allocate(path, method="uniform", granularity="channel", target_sparsity=0.3, round_to=1,
                            input_shapes=SHAPE)
        plans.append([(g["channels"], g["removed"]) for g in plan.options["group_removed"]])
        out = api.apply(path, plan, tmp_path / f"{path.stem}_ch.onnx")
        outputs.append(ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    assert plans[0] == plans[1] and len(plans[0]) == 12  # 6 x (heads, MLP width)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)
