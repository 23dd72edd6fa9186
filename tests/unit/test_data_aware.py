"""Wanda and OBS (SparseGPT) inside each layer: exact counts and patterns, the criteria's defining
properties, and OBS's point: the layer's output on the calibration data changes less than under magnitude."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune import api, workflows
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.passes.data_aware import DataAwareSparsifyPass, _obs, _wanda
from onnxprune.passes.sparsify import SparsifyPass
from onnxprune.tensors.masks import magnitude_mask
from tests.unit.nets import analysed, conv_chain, gemm_chain, initializer, run, sample, save, write_npz


def _gram(x: np.ndarray) -> np.ndarray:
    return x.T.astype(np.float64) @ x.astype(np.float64)


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Inputs with very different feature scales and correlations (where the criteria differ)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * rng.uniform(0.1, 3, d)


def test_obs_changes_the_layer_output_less_than_magnitude():
    rng = np.random.default_rng(1)
    x, w = _correlated(512, 32), rng.standard_normal((16, 32))  # (outputs, inputs)
    zeros = 16 * 32 // 2
    magnitude = np.where(magnitude_mask(w, zeros), w, 0)
    obs = _obs(w, _gram(x), zeros, None, damp=0.01, block=8)
    assert np.count_nonzero(obs == 0) == zeros
    err = {name: np.linalg.norm(x @ (v - w).T) for name, v in (("magnitude", magnitude), ("obs", obs))}
    assert err["obs"] < 0.8 * err["magnitude"], err  # 0.71 here


def test_wanda_scores_weights_by_their_input_norms_and_keeps_survivors():
    rng = np.random.default_rng(2)
    x, w = _correlated(256, 16), rng.standard_normal((4, 16))
    out = _wanda(w, np.diag(_gram(x)), 32, None, per_row=True)
    assert all(np.count_nonzero(row == 0) == 8 for row in out)  # each output row its share
    kept = out != 0
    assert np.array_equal(out[kept], w[kept])  # survivors unchanged
    score = np.abs(w) * np.linalg.norm(x, axis=0)
    assert all(score[r][~kept[r]].max() <= score[r][kept[r]].min() for r in range(4))


@pytest.mark.parametrize("criterion", ["wanda", "obs"])
def test_n_of_m_pattern_holds_for_both_criteria(criterion):
    rng = np.random.default_rng(3)
    x, w = _correlated(256, 16), rng.standard_normal((6, 16))
    out = _wanda(w, np.diag(_gram(x)), 0, (2, 4), per_row=True) if criterion == "wanda" else \
        _obs(w, _gram(x), 0, (2, 4), damp=0.01, block=8)
    assert ((out.reshape(6, 4, 4) != 0).sum(axis=2) == 2).all()


@pytest.mark.parametrize("build,names", [(gemm_chain, ("g1", "m2")), (lambda: conv_chain((8, 6)), ("c1", "c2"))])
def test_the_pass_meets_every_count_on_conv_gemm_and_matmul(build, names):
    proto = build()
    am = analysed(proto)
    shape = (64, 16) if names[0] == "g1" else (64, 3, 8, 8)
    batches = [{"x": sample(*shape, seed=5)}]
    layers = [layer for layer in am.layers if layer.name in names]
    targets = {layer.name: int(0.6 * np.prod(layer.weight_shape)) for layer in layers}
    pass_ = DataAwareSparsifyPass(layers, targets, "obs", batches)
    pass_(am.model)
    assert pass_.report.zeros == targets and not pass_.fallback


def test_obs_keeps_the_model_closer_than_magnitude(tmp_path):
    proto = conv_chain((8, 8))
    x = sample(128, 3, 8, 8, seed=6)
    dense = run(proto, {"x": x})[0]
    outs = {}
    for criterion in ("magnitude", "obs"):
        am = analysed(proto)
        layers = [layer for layer in am.layers if layer.name in ("c1", "c2")]
        targets = {layer.name: int(0.7 * np.prod(layer.weight_shape)) for layer in layers}
        p = SparsifyPass(layers, targets) if criterion == "magnitude" else \
            DataAwareSparsifyPass(layers, targets, "obs", [{"x": x}])
        p(am.model)
        outs[criterion] = run(am.model, {"x": x})[0]
    err = {k: float(np.linalg.norm(v - dense)) for k, v in outs.items()}
    assert err["obs"] < err["magnitude"], err


@pytest.fixture
def half_plan(tmp_path):
    """(apply's first arguments: a Gemm / MatMul chain and a uniform 50 % plan, calibration data)."""
    model = save(gemm_chain(), tmp_path / "m.onnx")
    data = write_npz(tmp_path / "d.npz", 32, 16)
    assert CliRunner().invoke(main, ["allocate", str(model), "--method", "uniform", "--target-sparsity", "0.5",
                                     "-o", str(tmp_path / "p.json")]).exit_code == 0
    return ["apply", str(model), str(tmp_path / "p.json"), "-o", str(tmp_path / "o.onnx")], str(data)


@pytest.mark.parametrize("extra,fragment", [
    (["--criterion", "obs"], "give --data"), (["--criterion", "l2"], "ranks channels"),
    (["--data", "DATA"], "--criterion wanda or obs"), (["--damp", "0.1"], "tune --criterion obs"),
    (["--criterion", "wanda", "--data", "DATA", "--block-size", "8"], "tune --criterion obs"),
    (["--criterion", "obs", "--data", "DATA", "--damp", "0"], "positive number")])
def test_cli_refuses_criteria_and_options_that_cannot_work(half_plan, tmp_path, extra, fragment):
    base, data = half_plan
    result = CliRunner().invoke(main, [*base, *(data if a == "DATA" else a for a in extra)])
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_obs_options_are_recorded_with_each_layers_output_error(half_plan, tmp_path):
    base, data = half_plan
    result = CliRunner().invoke(main, [*base, "--criterion", "obs", "--data", data, "--damp", "0.05",
                                       "--block-size", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    w = initializer(onnx.load(str(tmp_path / "o.onnx")), "wg")
    assert np.count_nonzero(w == 0) == w.size // 2
    out = json.loads(result.stdout)
    errors = [layer["output_error"] for layer in out["layers"]]
    assert errors and all(0 <= e < 1 for e in errors)  # each layer's relative output error on the data
    props = "".join(p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props)
    assert '"damp": 0.05' in props and '"block_size": 4' in props, props


def test_prune_takes_the_criterion(tmp_path):
    model = save(gemm_chain(), tmp_path / "m.onnx")
    data = write_npz(tmp_path / "d.npz", 32, 16)
    runner = CliRunner()
    result = runner.invoke(main, ["prune", str(model), "--target-sparsity", "0.5", "--criterion", "wanda",
                                  "--data", str(data), "--no-latency", "-o", str(tmp_path / "p.onnx"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert '"criterion": "wanda"' in result.stdout
    result = runner.invoke(main, ["prune", str(model), "--target-flops", "0.5", "--criterion", "obs", "--data",
                                  str(data), "--no-latency", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and "goes with --target-sparsity" in result.stderr


def test_sweep_tries_each_criterion_on_calibration_data(tmp_path):
    model = save(gemm_chain(), tmp_path / "m.onnx")
    data = write_npz(tmp_path / "d.npz", 64, 16, seed=1)
    calib = write_npz(tmp_path / "c.npz", 64, 16, seed=2)
    result = workflows.sweep(model, data, sparsities=(0.6,), methods=("uniform",), criteria=("magnitude", "obs"),
                             calibration=calib)
    assert [r["method"] for r in result.rows] == ["uniform", "uniform+obs"]
    assert all("error" not in r and r["top1"] is not None for r in result.rows)
    assert result.options["calibration"]["data"].endswith("c.npz")
    with pytest.raises(InputError, match="--calibration-data"):
        workflows.sweep(model, data, sparsities=(0.6,), methods=("uniform",), criteria=("obs",))


def test_obs_is_repeatable_and_the_same_with_external_data(tmp_path):
    """Same data and options, same bytes; a model stored with external data (its weights read one layer at a
    time, the pruned ones kept on disk until written) gives the same weights as one held in memory."""
    proto = gemm_chain()
    inline = save(proto, tmp_path / "m.onnx")
    external = tmp_path / "ext" / "m.onnx"
    external.parent.mkdir()
    onnx.save(proto, str(external), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data = write_npz(tmp_path / "d.npz", 48, 16)
    plan = api.allocate(inline, method="uniform", target_sparsity=0.6)
    outs = []
    for k, src in enumerate((inline, inline, external)):
        path = api.apply(src, plan, tmp_path / f"o{k}.onnx", criterion="obs", data=data, force=True).path
        outs.append({t.name: t.raw_data or onnx.numpy_helper.to_array(t).tobytes()
                     for t in onnx.load(str(path)).graph.initializer})
    assert outs[0] == outs[1] == outs[2]


def _depthwise_chain() -> onnx.ModelProto:
    """x (N, 4, 8, 8) -> depthwise 3x3 Conv (group 4, dilation 2, bias) -> Relu -> Conv 1x1 (6 outputs)."""
    from onnx import helper

    from tests.graphs import make_model, tensor, weights

    nodes = [helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="dw", group=4, dilations=[2, 2],
                              pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Conv", ["r", "wp"], ["y"], name="pw")]
    inits = [weights("wd", 4, 1, 3, 3, seed=1), weights("bd", 4, seed=2), weights("wp", 6, 4, 1, 1, seed=3)]
    return make_model(nodes, [tensor("x", "N", 4, 8, 8)], [tensor("y", "N", 6, 8, 8)], inits)


def _transposed() -> onnx.ModelProto:
    """x (N, 4, 5, 5) -> ConvTranspose (group 2, stride 2, pads 1, output_padding 1, bias) -> y (N, 6, 10, 10)."""
    from onnx import helper

    from tests.graphs import make_model, tensor, weights

    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", group=2, strides=[2, 2],
                            pads=[1, 1, 1, 1], output_padding=[1, 1])
    return make_model([node], [tensor("x", "N", 4, 5, 5)], [tensor("y", "N", 6, 10, 10)],
                      [weights("w", 4, 3, 3, 3, seed=4), weights("b", 6, seed=5)])


def test_a_conv_transpose_is_the_convolution_it_equals():
    from onnxprune.passes.data_aware import _columns, _groups, _rows
    from onnxprune.passes.reconstruct import layer_targets

    proto = _transposed()
    am = analysed(proto)
    up = next(layer for layer in am.layers if layer.name == "up")
    x = sample(3, 4, 5, 5, seed=8)
    y = layer_targets(run(proto, {"x": x})[0], up) - initializer(proto, "b")
    w = initializer(proto, "w")
    mat, back = _rows(up, w)
    np.testing.assert_array_equal(back(mat), w)  # the view and its inverse
    for out, channels in _groups(up):
        np.testing.assert_allclose(_columns(x, up, channels) @ mat[out].T, y[:, out], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["wanda", "obs"])
@pytest.mark.parametrize("build,name,zeros,shape", [(_depthwise_chain, "dw", 18, (64, 4, 8, 8)),
                                                    (_transposed, "up", 54, (32, 4, 5, 5))],
                         ids=["grouped-dilated", "transposed"])
def test_other_convolutions_are_pruned_from_their_inputs(criterion, build, name, zeros, shape):
    """Grouped (depthwise), dilated and transposed convolutions: half their weights, chosen from inputs of
    very different scales, which magnitude cannot see."""
    proto = build()
    x = sample(*shape, seed=7) * np.array([0.1, 1, 3, 10], np.float32)[None, :, None, None]
    dense = run(proto, {"x": x})[0]
    err = {}
    for how in ("magnitude", criterion):
        am = analysed(proto)
        layers = [layer for layer in am.layers if layer.name == name]
        p = SparsifyPass(layers, {name: zeros}) if how == "magnitude" else \
            DataAwareSparsifyPass(layers, {name: zeros}, criterion, [{"x": x}])
        p(am.model)
        assert p.report.zeros == {name: zeros} and not getattr(p, "fallback", {})
        err[how] = float(np.linalg.norm(run(am.model, {"x": x})[0] - dense))
    assert err[criterion] < err["magnitude"], err


def test_big_batches_are_taken_in_pieces_with_the_same_result(monkeypatch):
    import onnxprune.passes.data_aware as data_aware

    proto, x = conv_chain((8, 8)), sample(64, 3, 8, 8, seed=6)
    outs = []
    for limit in (data_aware.PIECE_ELEMENTS, 3000):  # 3000: one sample's im2col at a time
        monkeypatch.setattr(data_aware, "PIECE_ELEMENTS", limit)
        am = analysed(proto)
        layers = [layer for layer in am.layers if layer.name in ("c1", "c2")]
        DataAwareSparsifyPass(layers, {layer.name: int(0.7 * np.prod(layer.weight_shape)) for layer in layers},
                              "obs", [{"x": x}])(am.model)
        outs.append(run(am.model, {"x": x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
