"""Every command on the second panel of real-world structures (models/panel_sequences.py, issue 17): a CRNN
with a bidirectional LSTM, a voice-activity model whose layers sit in If branches and that takes audio, a
recurrent state and an int64 sample rate, a Conv1d audio classifier, and float16 versions of two panel.py
models.

Oracles: every command succeeds or refuses in one line (InputError); layers are found (in If branches and
recurrent nodes too) and FLOPs counted at the given shape; written models run on the real inputs, and the
output error against the dense model is finite and grows with sparsity; float16 models stay float16; the
classifiers keep their accuracy at mild pruning.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import api, workflows
from onnxprune.errors import InputError

SEQUENCE_PANEL = ("crnn", "vad", "audio1d", "lcnet_fp16", "dbnet_fp16")
CLASSIFIERS = ("audio1d", "lcnet_fp16")
NO_CHANNELS = ("vad",)  # every layer inside If branches: channels kept


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    from models.panel_sequences import export_sequence_model

    out = tmp_path_factory.mktemp("panel_sequences")
    return {name: export_sequence_model(name, out) for name in SEQUENCE_PANEL}


def _weight_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if len(t.dims) > 1}


@pytest.mark.parametrize("name", SEQUENCE_PANEL)
def test_every_command(panel, name, tmp_path):
    path, data, info = panel[name]
    values = info["input_values"]
    shape = [info["input_shape"]]
    found = api.inspect(path, input_shapes=shape)
    assert found.layers and found.flops and found.prunable_params > 0.9 * found.params
    if name == "crnn":
        assert {layer.op_type for layer in found.layers} >= {"Conv", "LSTM", "MatMul"}
    # scores: weights alone, and measured on the data (the metric suits the outputs)
    capacity = api.score(path, "capacity")
    sens = api.score(path, "sensitivity", data=data, grid=(0.5,), limit=32)
    assert sens.metric == ("kl" if name in CLASSIFIERS else "error")
    sr = api.score(path, "srinit", data=data, units="layers", limit=32)
    assert len(sr.units) == len(capacity.units) == len(found.layers)
    # unstructured and N:M, more sparsity -> further from the dense outputs
    errors = []
    for target in (0.3, 0.7):
        plan = api.allocate(path, method="capacity", scores=capacity, target_sparsity=target)
        out = api.apply(path, plan, tmp_path / f"u{target}.onnx", input_values=values)
        errors.append(api.evaluate(out.path, data, reference=path, limit=32).output_error)
    assert 0 < errors[0] < errors[1] < 100, errors
    nm = api.apply(path, plan, tmp_path / "nm.onnx", granularity="n:m", input_values=values)
    assert np.isfinite(api.evaluate(nm.path, data, reference=path, limit=32).output_error)
    # channels, refit on the data
    if name in NO_CHANNELS:
        with pytest.raises(InputError, match="inside If / Loop / Scan bodies keep their channels"):
            api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3,
                         input_shapes=shape)
    else:
        ch = api.allocate(path, method="uniform", granularity="channel", budget="flops", target_sparsity=0.3,
                          input_shapes=shape)
        refit = api.apply(path, ch, tmp_path / "ch.onnx", data=data, limit=32)
        assert refit.totals["flops_after"] < refit.totals["flops_before"]
        assert np.isfinite(api.evaluate(refit.path, data, reference=path, limit=32).output_error)
    # prune in one go, then finetune: done, or refused in one line for what it cannot train
    pruned = workflows.prune(path, tmp_path / "p.onnx", target_sparsity=0.5, data=data, limit=32,
                             input_values=values)
    assert pruned.after.params == pruned.before.params and pruned.applied.totals["zeros"] > 0
    try:
        tuned = api.finetune(pruned.path, data, tmp_path / "t.onnx", teacher=path, limit=32,
                             options=api.FinetuneOptions(epochs=1, batch_size=16))
        assert tuned.path.exists()
    except InputError as exc:
        assert name in ("crnn", "vad") and "\n" not in str(exc)
    sweep = workflows.sweep(path, data, sparsities=(0.5,), methods=("uniform",), limit=32)
    assert sweep.rows[0].get(sweep.metric) is not None
    if name.endswith("_fp16"):  # written back in the model's own type
        for written in (out.path, refit.path, pruned.path):
            assert _weight_types(written) == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_keep_their_accuracy(panel, name, tmp_path):
    path, data, info = panel[name]
    dense = api.evaluate(path, data).top1
    assert dense > 85 and abs(dense - info["accuracy"]) < 0.5
    plan = api.allocate(path, method="lamp", target_sparsity=0.3)
    out = api.apply(path, plan, tmp_path / "s.onnx")
    assert api.evaluate(out.path, data).top1 > dense - 5


def test_the_voice_model_runs_both_sample_rates(panel, tmp_path):
    """Its 8 kHz branch is pruned too, and the data of either rate runs the pruned model."""
    from models.vad_if import vad_if_data

    path, data16, _ = panel["vad"]
    data8 = tmp_path / "vad8k.npz"
    np.savez(data8, **vad_if_data(n=32, samples=256, rate=8000))
    plan = api.allocate(path, method="uniform", target_sparsity=0.5)
    out = api.apply(path, plan, tmp_path / "p.onnx", input_values=["sr=8000", "state=0"])
    for data in (data16, data8):
        assert 0 < api.evaluate(out.path, data, reference=path).output_error < 100
    scores = api.score(path, "sensitivity", data=data8, grid=(0.5,))
    assert {u["name"] for u in scores.units if u.get("unscored")} == {
        u["name"] for u in scores.units if "/then_branch/" in u["name"]}
