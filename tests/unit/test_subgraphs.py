"""Layers inside If bodies (issue 17), on the voice-activity model of models/vad_if.py: found, counted and
pruned unstructured and N:M (weights in the outer scope and in a branch's own initializers alike), scored
by data only where the data goes (a branch it never takes is reported unscored, not unimportant), fed its
three inputs from the .npz."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.vad_if import vad_if_data, vad_if_model
from onnxprune import api
from onnxprune.errors import InputError
from tests.unit.nets import save

BRANCHES = ("then_branch", "else_branch")


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    path = save(vad_if_model(), folder / "vad.onnx")
    np.savez(folder / "vad16k.npz", **vad_if_data(n=32))
    return path, folder / "vad16k.npz"


def test_layers_in_both_branches_are_found_and_counted(vad):
    path, _ = vad
    result = api.inspect(path, input_shapes=["input:1,512"])
    assert len(result.layers) == 10
    assert {(layer.scope, layer.branch) for layer in result.layers} == {("If_2", b) for b in BRANCHES}
    assert {layer.name for layer in result.layers if layer.branch == "then_branch"} == {
        "If_2/then_branch/Conv_1", "If_2/then_branch/Conv_3", "If_2/then_branch/LSTM_7.W",
        "If_2/then_branch/LSTM_7.R", "If_2/then_branch/MatMul_10"}
    assert all(layer.flops for layer in result.layers) and result.flops == sum(layer.flops for layer in result.layers)
    assert result.prunable_params >= result.params  # every weight sits in a branch
    assert any("inside the bodies of If_2" in note for note in result.notes)


@pytest.mark.parametrize("granularity", ["unstructured", "n:m"])
def test_branch_weights_are_pruned_where_they_live(vad, tmp_path, granularity):
    path, data = vad
    plan = api.allocate(path, method="uniform", target_sparsity=0.5)
    out = api.apply(path, plan, tmp_path / "p.onnx", granularity=granularity, input_values=["sr=16000"])
    pruned = onnx.load(str(out.path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    # sr8k's convolutions were initializers of their branch: now the main graph's, pruned like the rest
    for name in ("sr16k_conv2_w", "sr8k_conv2_w", "sr16k_lstm_W", "sr8k_lstm_R"):
        assert 0.45 <= float(np.mean(weights[name] == 0)) <= 0.55, name
    for rate, samples in ((16000, 512), (8000, 256)):
        error = api.evaluate(out.path, data if rate == 16000 else _npz(tmp_path, rate, samples),
                             reference=path).output_error
        assert np.isfinite(error) and error > 0


def _npz(folder, rate, samples):
    path = folder / f"vad{rate}.npz"
    np.savez(path, **vad_if_data(n=16, samples=samples, rate=rate))
    return path


def test_a_branch_the_data_never_takes_is_unscored(vad):
    path, data = vad
    scores = api.score(path, "sensitivity", data=data, grid=(0.5, 0.9))
    unscored = {u["name"] for u in scores.units if u.get("unscored")}
    assert unscored == {u["name"] for u in scores.units if "/else_branch/" in u["name"]}
    assert all(u["importance"] == 1.0 and u["mean_drop"] is None for u in scores.units if u["name"] in unscored)
    assert any(u["mean_drop"] > 0 for u in scores.units if "/then_branch/" in u["name"])
    plan = api.allocate(path, method="sensitivity", scores=scores, target_sparsity=0.3)
    assert all(entry["sparsity"] == 0 for entry in plan.layers if entry["name"] in unscored)
    sr = api.score(path, "srinit", data=data, units="layers")
    assert {u["name"] for u in sr.units if u.get("unscored")} == unscored


def test_channels_inside_bodies_stay_whole(vad):
    path, _ = vad
    with pytest.raises(InputError, match="reaches at most 0.000"):
        api.allocate(path, method="uniform", granularity="channel", target_sparsity=0.3)
