"""Fashion-MNIST end to end: the dataset from the Debian package ``dataset-fashion-mnist`` (a complete
60,000-image train split and the 10,000-image test split, 28x28 grey), the VGG-style CNN of models/small.py
trained on it, exported to ONNX with BatchNorm folded, and the splits written as .npz for the CLI.

    apt-get install -y dataset-fashion-mnist
    python -m models.fashion -o build/fashion            # cnn.onnx, train.npz, test.npz

The folder can be changed with FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.small import PlainCNN, fit

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``train`` or ``test``: uint8 images N x 1 x 28 x 28 and int64 labels."""
    folder = Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    prefix = "train" if split == "train" else "t10k"
    images = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(f"{images} not found: apt-get install -y dataset-fashion-mnist "
                                "(or set FASHION_MNIST_DIR)")
    x = _idx(images)[:, None]
    y = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def train(epochs: int = 2, width: int = 16, seed: int = 0) -> tuple[PlainCNN, float]:
    """The CNN trained on the 60,000 training images (Adam, batch 128); returns it and its test top-1."""
    torch.manual_seed(seed)
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    model = PlainCNN(width=width, image_size=28)
    return model, fit(model, xtr, ytr, xte, yte, epochs=epochs, lr=2e-3, batch_size=128, seed=seed)


def main(argv: list[str] | None = None) -> int:
    from models.export import export_onnx

    parser = argparse.ArgumentParser(prog="python -m models.fashion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="build/fashion", help="folder for cnn.onnx, train.npz, test.npz")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, acc = train(args.epochs)
    export_onnx(model, torch.rand(2, 1, 28, 28), out / "cnn.onnx",
                metadata={"onnxprune.source": f"models/small.py PlainCNN on Fashion-MNIST (test top-1 {acc:.2f} %)"})
    for split in ("train", "test"):
        x, y = load_split(split)
        np.savez(out / f"{split}.npz", x=x, y=y)
    print(f"trained in {time.perf_counter() - t0:.0f} s: test top-1 {acc:.2f} %; wrote {out}/cnn.onnx, "
          f"train.npz (60,000), test.npz (10,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
