"""Recovery: the ONNX -> torch -> ONNX round trip, BatchNorm insertion and folding, masks, fine-tuning and
recalibration (onnxprune.recovery, `onnxprune finetune`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import onnxprune
from onnxprune import api
from onnxprune.cli import main
from onnxprune.io import load_model
from onnxprune.recovery.convert import OnnxModule
from onnxprune.recovery.finetune import FinetuneOptions, _bn_identity_init, build_module
from tests.test_blocks import SR_INIT_RESNET56_BLOCKS, block_plan


def _run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _feeds(path, batch=3):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        feeds[i.name] = (rng.integers(1, 1000, shape).astype(np.int64) if "int" in i.type
                         else rng.standard_normal(shape).astype(np.float32))
    return sess, feeds


@pytest.mark.parametrize("name,kw", [("resnet56", {}), ("resnet56", {"keep_bn": True}), ("resnet20", {"dynamo": True}),
                                     ("cnn", {}), ("mlp", {}), ("transformer-pre", {}), ("transformer-post", {}),
                                     ("resnet-proj", {})])
def test_module_computes_what_onnx_runtime_computes(export, name, kw):
    path = export(name, **kw)
    sess, feeds = _feeds(path)
    ref = sess.run(None, feeds)
    mod = OnnxModule(load_model(path)).eval()
    with torch.no_grad():
        got = mod(*[torch.from_numpy(feeds[n]) for n in mod.input_names])
    np.testing.assert_allclose(got.numpy(), ref[0], atol=1e-5, rtol=1e-5)


def test_minilm_converts(minilm):
    sess, feeds = _feeds(minilm)
    ref = sess.run(None, feeds)
    mod = OnnxModule(load_model(minilm)).eval()
    with torch.no_grad():
        got = mod(*[torch.from_numpy(feeds[n]) for n in mod.input_names])
    got = got if isinstance(got, tuple) else (got,)
    np.testing.assert_allclose(got[0].numpy(), ref[0], atol=1e-5, rtol=1e-4)


def test_round_trip_with_inserted_batchnorm_is_exact_before_training(export, cifar_lossless, tmp_path):
    """Folded ResNet-56: BatchNorm inserted after every Conv, set to the identity of the data's statistics,
    folded back on export: the written model computes what the input does (1e-5)."""
    path = export("resnet56")
    m = load_model(path)
    mod = build_module(m, "auto")
    assert len(mod.inserted) == sum(n.op_type == "Conv" for n in m.graph)
    x = np.load(cifar_lossless)["x"][:64].astype(np.float32) / 255
    _bn_identity_init(mod, torch.from_numpy(x), 32, {})
    # the inserted layers are real: their running statistics are the data's, not the identity defaults
    assert not torch.allclose(mod.bn_stats(0)[1], torch.ones_like(mod.bn_stats(0)[1]))
    mod.write_back(m)
    assert all(len(n.inputs) == 3 for n in m.graph if n.op_type == "Conv")  # bias added where there was none
    out = tmp_path / "rt.onnx"
    onnxprune.io.save_model(m, out, verify=api.check_runs)
    np.testing.assert_allclose(_run(out, x), _run(path, x), atol=1e-5, rtol=1e-5)
    names_in = [i.name for i in onnx.load(str(path)).graph.input]
    assert [i.name for i in onnx.load(str(out)).graph.input] == names_in


def _sparse_cnn(export, tmp_path, sparsity=0.9, criterion="magnitude", data=None):
    path = export("cnn")
    plan = api.allocate(path, method="lamp", target_sparsity=sparsity)
    return api.apply(path, plan, tmp_path / "sparse.onnx", criterion=criterion, data=data, limit=256).path


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory):
    from models.small import digits_split

    xtr, ytr, _, _ = digits_split()
    p = tmp_path_factory.mktemp("digits") / "train.npz"
    np.savez(p, x=xtr, y=ytr)
    return p


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("criterion", ["magnitude", "obs"])
def test_masks_survive_training(export, digits_train, digits_npz, tmp_path, criterion):
    """The zeros stay exactly zero, whoever chose them (obs also moved the kept weights)."""
    sparse = _sparse_cnn(export, tmp_path, criterion=criterion, data=digits_train if criterion == "obs" else None)
    before = _weights(sparse)
    res = api.finetune(sparse, digits_train, tmp_path / "tuned.onnx", options=FinetuneOptions(epochs=2, lr=0.05),
                       eval_data=digits_npz)
    after = _weights(res.path)
    assert res.masked_weights > 0
    changed = 0
    for name, w in before.items():
        if w.ndim >= 2 and (w == 0).mean() > 0.5:
            np.testing.assert_array_equal(after[name][w == 0], 0)  # zeros stay zero
            changed += int(not np.allclose(after[name], w))  # ... and the rest trained
    assert changed > 0
    assert res.after_top1 is not None and res.history


def test_short_tuning_improves_a_damaged_model(export, digits_train, digits_npz, tmp_path):
    """90 % sparse CNN: a few epochs with labels lower the training loss and raise held-out accuracy; the
    written model (ONNX Runtime) agrees with the torch module's last evaluation."""
    sparse = _sparse_cnn(export, tmp_path)
    base = api.evaluate(sparse, digits_npz).top1
    res = api.finetune(sparse, digits_train, tmp_path / "tuned.onnx",
                       options=FinetuneOptions(epochs=4, lr=0.05, augment=()), eval_data=digits_npz)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.after_top1 > base + 5
    assert abs(res.after_top1 - res.history[-1]["eval_top1"]) < 1.0
    assert api.evaluate(res.path, digits_npz).top1 == pytest.approx(res.after_top1)


def test_distillation_without_labels(export, digits_train, digits_npz, tmp_path):
    path = export("cnn")
    sparse = _sparse_cnn(export, tmp_path, 0.8)
    res = api.finetune(sparse, digits_train, tmp_path / "kd.onnx", teacher=path, labels=False,
                       options=FinetuneOptions(epochs=3, lr=0.05, augment=()), eval_data=digits_npz)
    assert not res.labels and res.teacher
    assert res.history[-1]["train_top1"] is not None  # labels still reported when present
    assert res.after_top1 >= api.evaluate(sparse, digits_npz).top1


@pytest.mark.slow
def test_recalibration_recovers_removed_blocks(export, cifar_jpeg, cifar_lossless, tmp_path):
    """ResNet-56, the reference's 10 blocks removed: re-estimating BatchNorm (BN kept) and mapping the
    folded graph's convolutions to the teacher's statistics both lift top-1 without any training."""
    results = {}
    for keep_bn in (True, False):
        path = export("resnet56", keep_bn=keep_bn)
        info = onnxprune.inspect(path)
        pruned = api.apply(path, block_plan(path, [info.blocks[i].name for i in SR_INIT_RESNET56_BLOCKS]),
                           tmp_path / f"sr_{keep_bn}.onnx").path
        before = api.evaluate(pruned, cifar_lossless).top1
        res = api.finetune(pruned, cifar_jpeg, tmp_path / f"recal_{keep_bn}.onnx", teacher=path,
                           options=FinetuneOptions(epochs=0, calibration=1024), eval_data=cifar_lossless,
                           offset=1017, limit=1024)
        results[keep_bn] = (before, res.after_top1)
        assert res.after_top1 > before + 5, results
        assert res.history == []
    assert results[False][1] > 30


def test_cli_finetune_and_errors(export, digits_train, digits_npz, tmp_path):
    sparse = _sparse_cnn(export, tmp_path)
    runner = CliRunner()
    out = tmp_path / "t.onnx"
    r = runner.invoke(main, ["finetune", str(sparse), "--data", str(digits_train), "--epochs", "1", "--augment",
                             "none", "--eval-data", str(digits_npz), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    bad = [
        (["--data", str(digits_train), "--recalibrate-bn", "--epochs", "2"], "trains nothing"),
        (["--augment", "rotate", "--data", str(digits_train)], "unknown augmentation"),
        ([], "needs training data"),
        (["--data", str(digits_train), "--teacher", str(tmp_path / "missing.onnx")], "not found"),
        (["--data", str(digits_train), "--no-labels"], "nothing to learn from"),
        (["--data", str(digits_train), "--lr", "-1"], "--lr"),
    ]
    for args, msg in bad:
        target = tmp_path / "bad.onnx"
        r = runner.invoke(main, ["finetune", str(sparse), "-o", str(target), *args])
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (args, r.output)
        assert not target.exists()


def test_cli_recalibrate_folded_needs_teacher(export, digits_train, tmp_path):
    path = export("cnn")
    r = CliRunner().invoke(main, ["finetune", str(path), "--data", str(digits_train), "--recalibrate-bn",
                                  "-o", str(tmp_path / "r.onnx")])
    assert r.exit_code == 2 and "--teacher" in r.output


def test_without_torch_says_how_to_install(export, digits_train, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; from onnxprune.cli import main; "
            f"main(['finetune', {str(export('cnn'))!r}, '--data', {str(digits_train)!r}, '-o', "
            f"{str(tmp_path / 'x.onnx')!r}])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "pip install 'onnxprune[torch]'" in r.stderr
    assert "Traceback" not in r.stderr
