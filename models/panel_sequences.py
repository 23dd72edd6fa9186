"""The second panel of real-world structures (issue 17): recurrent layers, layers inside If branches,
several inputs, 1-D convolutions and float16, exported the way real exporters emit them.

- ``crnn``: a CRNN text recognizer (PaddleOCR rec / EasyOCR structure): convolutions, then a bidirectional
  LSTM over the width, a linear head and log-softmax per step (CTC-style output (batch, steps, classes));
  dynamic batch and width. Random weights: output-fidelity oracles.
- ``vad``: the voice-activity model of models/vad_if.py (its layers inside the two branches of an If chosen
  by an int64 sample-rate input, a recurrent state input and output).
- ``audio1d``: a Conv1d keyword-spotting classifier (BatchNorm folded by the exporter), trained briefly on
  synthetic tones (5 pitches).
- ``lcnet_fp16``, ``dbnet_fp16``: panel.py's PP-LCNet-style classifier and DB-style text detector converted to
  float16 (weights, activations, inputs and outputs), as onnxconverter-common does for deployment.

    python -m models.panel_sequences -o build/panel_sequences
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx

__all__ = ["SEQUENCE_PANEL", "export_sequence_model"]

SEQUENCE_PANEL = ("crnn", "vad", "audio1d", "lcnet_fp16", "dbnet_fp16")
SEED = 0
CRNN_CLASSES = 12
TONES = 5


def _torch_export(model, example, path: Path, input_name: str, output_name: str, axes: dict, out_axes: dict,
                  opset: int = 17) -> onnx.ModelProto:
    import torch

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: axes, output_name: out_axes}, do_constant_folding=True)
    return onnx.load(str(path))


def _crnn():
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d((2, 1)),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
            self.rnn = nn.LSTM(32, 32, bidirectional=True, batch_first=True)
            self.head = nn.Linear(64, CRNN_CLASSES)

        def forward(self, x):
            f = self.convs(x).mean(2).transpose(1, 2)  # (batch, width, features)
            h, _ = self.rnn(f)
            return self.head(h).log_softmax(-1)

    torch.manual_seed(SEED)
    return CRNN()


def _audio1d():
    from torch import nn

    class KWS(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
                nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                nn.Linear(32, TONES))

        def forward(self, x):
            return self.net(x)

    return KWS()


def tones(n: int, samples: int = 400, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Noisy sine bursts of ``TONES`` pitches, (n, 1, samples) float32, and their pitch index."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, TONES, n)
    t = np.arange(samples) / 4000.0
    freq = 200.0 * (1 + y)[:, None] * rng.uniform(0.97, 1.03, (n, 1))
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.3, (n, 1))) * rng.uniform(0.3, 1.0, (n, 1))
    x = x + 0.3 * rng.standard_normal((n, samples))
    return x[:, None, :].astype(np.float32), y.astype(np.int64)


def _train_audio1d():
    import torch

    from models.panel import _one_thread

    torch.manual_seed(SEED)
    model = _audio1d()
    x, y = tones(1024, seed=SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with _one_thread():
        model.train()
        for _ in range(6):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
                loss.backward()
                opt.step()
    return model.eval()


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model in float16 throughout, inputs and outputs included (onnxconverter-common)."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(proto, keep_io_types=False)


def export_sequence_model(name: str, out_dir: Path | str) -> tuple[Path, Path, dict]:
    """Write ``<out_dir>/<name>.onnx`` and its data ``<out_dir>/<name>_test.npz``; returns the two paths and
    info: ``input_shape`` (NAME:D0,...), ``kind``, ``accuracy`` (top-1 % or None), ``input_values``."""
    if name not in SEQUENCE_PANEL:
        raise ValueError(f"unknown panel model {name!r}; choose from {', '.join(SEQUENCE_PANEL)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, data = out / f"{name}.onnx", out / f"{name}_test.npz"
    info: dict = {"accuracy": None, "input_values": []}
    if name == "crnn":
        import torch

        proto = _torch_export(_crnn(), torch.rand(1, 1, 16, 48), path, "x", "logp", {0: "batch", 3: "width"},
                              {0: "batch", 1: "steps"})
        np.savez(data, x=np.random.default_rng(SEED + 1).random((64, 1, 16, 48), np.float32))
        info.update(input_shape="x:1,1,16,48", kind="sequence")
    elif name == "vad":
        from models.vad_if import INPUT_SHAPE, vad_if_data, vad_if_model

        proto = vad_if_model(SEED)
        np.savez(data, **vad_if_data(n=64))
        info.update(input_shape=INPUT_SHAPE, kind="detector", input_values=["sr=16000", "state=0"])
    elif name == "audio1d":
        import torch

        model = _train_audio1d()
        proto = _torch_export(model, torch.rand(1, 1, 400), path, "audio", "logits", {0: "batch", 2: "samples"},
                              {0: "batch"})
        x, y = tones(512, seed=SEED + 7)
        np.savez(data, x=x, y=y)
        info.update(input_shape="audio:1,1,400", kind="classifier")
    else:  # float16 versions of panel.py models
        from models.panel import export_panel_model

        base = name.removesuffix("_fp16")
        base_path, base_data, base_info = export_panel_model(base, out / "float32", verify=False)
        proto = to_float16(onnx.load(str(base_path)))
        with np.load(base_data) as npz:
            arrays = {k: npz[k].astype(np.float16) if npz[k].dtype.kind == "f" else npz[k] for k in npz.files}
        if base == "lcnet":  # uint8 images: onnxprune scales them to [0, 1] as float16
            arrays["x"] = (arrays["x"].astype(np.float32) / 255.0).astype(np.float16)
        np.savez(data, **arrays)
        info.update(input_shape=base_info["input_shape"], kind=base_info["kind"])
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    if info["kind"] == "classifier":
        info["accuracy"] = _accuracy(path, data)
    return path, data, info


def _accuracy(path: Path, data: Path) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(data) as npz:
        x, y = npz["x"], npz["y"]
    inp = sess.get_inputs()[0]
    logits = sess.run(None, {inp.name: x})[0]
    return float((logits.argmax(1) == y).mean() * 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.panel_sequences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", default="build/panel_sequences")
    args = parser.parse_args(argv)
    for name in SEQUENCE_PANEL:
        path, data, info = export_sequence_model(name, args.out)
        print(f"{path} + {data.name}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
