"""Every command on the panel of real-world structures (models/panel.py, issue 16): a YOLOv8-style detector,
a DB-style text detector with ConvTranspose, a PP-LCNet-style classifier, a graph with its batch fixed at 1
and a tf2onnx-style NHWC graph with ':0' names, all exported with dynamic dimensions as their exporters do.

Oracles: every command succeeds (or, for what a model cannot do, refuses in one line with exit 2); FLOPs
are counted at the given shape; written models run at that shape and at another one (their dynamic
dimensions kept) with the dense model's output shapes; channel pruning removes FLOPs; the classifiers keep
their accuracy at mild pruning; the detectors' refit reduces the layers' reconstruction error.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxprune import api, workflows
from onnxprune.cli import main
from onnxprune.errors import InputError

PANEL = ("yolo", "dbnet", "lcnet", "fixed_batch", "nhwc")
CLASSIFIERS = ("lcnet", "fixed_batch", "nhwc")
OTHER_SIZE = {"yolo": (1, 3, 96, 96), "dbnet": (1, 3, 96, 96), "lcnet": (1, 3, 48, 48), "fixed_batch": None,
              "nhwc": (3, 8, 8, 1)}


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """name -> (model path, test data path, info) for every panel model, exported once."""
    from models.panel import export_panel_model

    out = tmp_path_factory.mktemp("panel")
    return {name: export_panel_model(name, out, verify=False) for name in PANEL}


def _shape(info: dict) -> tuple[str, tuple[int, ...]]:
    name, _, dims = info["input_shape"].rpartition(":")
    return name, tuple(int(d) for d in dims.split(","))


def _outputs(path, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _check_runs_like(dense, pruned, info, name):
    """The pruned model runs at the given shape and at another size, with the dense model's output shapes."""
    input_name, shape = _shape(info)
    for dims in [shape] + ([OTHER_SIZE[name]] if OTHER_SIZE[name] else []):
        x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
        want, got = _outputs(dense, {input_name: x}), _outputs(pruned, {input_name: x})
        assert [o.shape for o in got] == [o.shape for o in want]


@pytest.mark.parametrize("name", PANEL)
def test_inspect_counts_flops_at_the_given_shape(panel, name):
    path, _, info = panel[name]
    at = api.inspect(path, input_shapes=[info["input_shape"]])
    assert at.flops and at.flops > 0 and at.layers
    bare = api.inspect(path)
    input_name, shape = _shape(info)
    if name in ("yolo", "dbnet", "lcnet"):  # height and width are dynamic
        assert bare.flops is None and any("dimensions 2 ('height'), 3 ('width')" in n or "dimensions 2" in n
                                          for n in bare.notes)
    else:
        assert bare.flops == at.flops


@pytest.mark.parametrize("name", PANEL)
def test_score_allocate_apply_every_granularity(panel, name, tmp_path):
    path, data, info = panel[name]
    shape = [info["input_shape"]]
    dense_flops = api.inspect(path, input_shapes=shape).flops
    # data-driven scores: the metric suits the outputs (error for detectors, kl / top-1 for classifiers)
    sens = api.score(path, "sensitivity", data=data, grid=(0.5,), limit=32)
    assert sens.metric == ("kl" if name in CLASSIFIERS else "error")
    assert all(np.isfinite(u["mean_drop"]) for u in sens.units)
    assert bool(sens.input_shapes) == (name in ("yolo", "dbnet", "lcnet"))  # the data fixed what was dynamic
    units = "blocks" if api.inspect(path).blocks else "layers"
    sr = api.score(path, "srinit", data=data, units=units, limit=32)
    assert sr.metric == ("top1" if name in CLASSIFIERS else "error")
    # unstructured and N:M from a capacity plan; the plan remembers nothing about shapes it was not given
    plan = api.allocate(path, method="lamp", target_sparsity=0.5, input_shapes=shape)
    for granularity in ("unstructured", "n:m"):
        out = tmp_path / f"{granularity.replace(':', '')}.onnx"
        res = api.apply(path, plan, out, granularity=granularity)
        assert res.totals["params_sparsity"] > 0.4
        _check_runs_like(path, out, info, name)
    # the same plan, the zeros chosen from the data (obs unstructured, wanda 2:4): every planned zero made,
    # no layer left to magnitude, the model still runs at every size
    for criterion, granularity in (("obs", "unstructured"), ("wanda", "n:m")):
        out = tmp_path / f"{criterion}.onnx"
        res = api.apply(path, plan, out, granularity=granularity, criterion=criterion, data=data, limit=32)
        assert res.totals["params_sparsity"] > 0.4 and not res.totals.get("magnitude_fallback"), res.totals
        if granularity == "unstructured":
            assert res.totals["zeros"] == sum(layer["zeros"] for layer in plan.layers)
        _check_runs_like(path, out, info, name)
    # sensitivity plan over FLOPs: the scores' sizes are reused
    flops_plan = api.allocate(path, method="sensitivity", scores=sens, target_sparsity=0.3, budget="flops")
    assert flops_plan.input_shapes == sens.input_shapes and flops_plan.totals["flops_sparsity"] is not None
    # channels, default rounding, with and without the least-squares refit
    ch = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3,
                      input_shapes=shape)
    assert ch.options["round_to_auto"] and ch.totals["flops_before"] == dense_flops
    plain = api.apply(path, ch, tmp_path / "ch.onnx")
    refit = api.apply(path, ch, tmp_path / "chr.onnx", data=data, limit=32)
    for res in (plain, refit):
        assert res.totals["flops_after"] < res.totals["flops_before"] == dense_flops
        assert res.totals["params_after"] == ch.totals["params_after"]  # the plan's prediction, exactly
        _check_runs_like(path, res.path, info, name)
    if refit.totals["refit"]["layers"]:
        assert refit.totals["refit"]["mean_error_after"] <= refit.totals["refit"]["mean_error_before"] + 1e-9


@pytest.mark.parametrize("name", PANEL)
def test_prune_and_its_refusals(panel, name, tmp_path):
    path, data, info = panel[name]
    res = workflows.prune(path, tmp_path / "p.onnx", target_flops=0.3, data=data, limit=64)
    assert res.after.flops < res.before.flops and res.before.latency_ms > 0
    _check_runs_like(path, res.path, info, name)
    if name in CLASSIFIERS:
        assert res.before.top1 > 80 and res.after.top1 is not None
    else:  # no labels: the outputs are compared with the dense model's
        assert res.before.output_error == 0 and 0 < res.after.output_error < 100
    # recovery: labels and/or distillation (KL of class scores; relative squared error of boxes and maps),
    # the teacher fed the batch its graph fixes
    tuned = api.finetune(res.path, data, tmp_path / "t.onnx", teacher=path, limit=64,
                         options=api.FinetuneOptions(epochs=1, batch_size=32))
    _check_runs_like(path, tuned.path, info, name)
    if not api.inspect(path).blocks:
        with pytest.raises(InputError, match="no residual blocks to remove"):
            workflows.prune(path, tmp_path / "b.onnx", remove_blocks=1, data=data, force=True)
    if name in ("yolo", "dbnet", "lcnet"):  # dynamic height and width, no data: no number made up
        with pytest.raises(InputError, match="depend on the size of dimensions 2"):
            workflows.prune(path, tmp_path / "q.onnx", target_flops=0.3, force=True)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_keep_their_accuracy_and_sweep(panel, name, tmp_path):
    path, data, _ = panel[name]
    dense = api.evaluate(path, data).top1
    plan = api.allocate(path, method="lamp", target_sparsity=0.3)
    api.apply(path, plan, tmp_path / "s.onnx")
    assert api.evaluate(tmp_path / "s.onnx", data).top1 > dense - 5
    sweep = workflows.sweep(path, data, sparsities=(0.5,), methods=("uniform",), limit=128)
    assert sweep.rows[0]["top1"] is not None


@pytest.mark.parametrize("name", ["yolo", "dbnet"])
def test_unlabelled_outputs_are_measured_against_the_dense_model(panel, name, tmp_path):
    """eval --reference and sweep without labels: the output error of each pruned model, growing with the
    sparsity; a reference with other inputs or outputs is refused."""
    path, data, _ = panel[name]
    assert api.evaluate(path, data, reference=path, limit=16).output_error == 0
    sweep = workflows.sweep(path, data, sparsities=(0.3, 0.8), methods=("uniform",), limit=32)
    assert sweep.metric == "output_error" and sweep.dense["output_error"] == 0
    errors = [row["output_error"] for row in sweep.rows]
    assert 0 < errors[0] < errors[1], errors
    other = panel["lcnet"][0]
    with pytest.raises(InputError, match="--reference"):
        api.evaluate(path, data, reference=other, limit=16)


def test_the_cli_on_the_detector(panel, tmp_path):
    """The one-line refusals and the shape option through the command line."""
    path, data, info = panel["yolo"]
    runner = CliRunner()
    bad = runner.invoke(main, ["allocate", str(path), "--method", "uniform", "--granularity", "channel",
                               "--budget", "flops", "--target-sparsity", "0.3", "-o", str(tmp_path / "p.json")])
    assert bad.exit_code == 2 and "--input-shape images:1,3,N,N" in bad.stderr and "Traceback" not in bad.stderr
    ok = runner.invoke(main, ["prune", str(path), "--target-flops", "0.3", "--input-shape", info["input_shape"],
                              "-o", str(tmp_path / "p.onnx")])
    assert ok.exit_code == 0, ok.stderr
    assert not (tmp_path / "p.json").exists()
