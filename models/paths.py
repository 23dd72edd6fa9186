"""Where the shared real data lives: one setting, ``ONNXPRUNE_DATA``, defaulting to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data folder (env ``ONNXPRUNE_DATA``, default ``<repo>/../shared/data``)."""
    return Path(os.environ.get("ONNXPRUNE_DATA", _REPO.parent / "shared" / "data")).resolve()


def cifar_weights(depth: int) -> Path:
    folder = data_dir() / "models" / "akamaster_resnet_cifar10"
    matches = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not matches:
        raise FileNotFoundError(
            f"no pretrained resnet{depth} weights in {folder}; set ONNXPRUNE_DATA to the shared data folder"
        )
    return matches[0]


def cifar_data(name: str = "lossless") -> Path:
    files = {
        "lossless": "cifar10_test_lossless_first1017.npz",
        "jpeg": "cifar10_test_jpeg_q75.npz",
    }
    return data_dir() / "cifar10" / files[name]
