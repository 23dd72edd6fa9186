"""A VGG-16-layout network (13 conv + 3 linear layers, the architecture of the "How Compact?" headline),
narrowed to train on a CPU in minutes, on Fashion-MNIST (Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# VGG-16 configuration (channel counts, "M" = max-pool), divided by ``width_div``; 28x28 inputs allow 4 pools.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG16Narrow(nn.Module):
    def __init__(self, width_div: int = 4, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = v // width_div
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        hidden = 512 // width_div
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images N x 1 x 28 x 28 and int64 labels of the 'train' (60,000) or 'test' (10,000) split."""
    prefix = "train" if split == "train" else "t10k"
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"{images} not found: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)"
        )
    x = _read_idx(images)[:, None]
    y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def train_vgg(epochs: int = 3, seed: int = 0, width_div: int = 4, batch_size: int = 128,
              log=print) -> tuple[VGG16Narrow, float]:
    """Train on the full Fashion-MNIST train split (SGD, one-cycle); returns the model and test top-1 (%)."""
    torch.manual_seed(seed)
    model = VGG16Narrow(width_div)
    x, y = fashion_mnist("train")
    xt = torch.from_numpy(x).float() / 255.0
    yt = torch.from_numpy(y)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{epochs} done")
    model.eval()
    xte, yte = fashion_mnist("test")
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(xte[i:i + 1000]).float() / 255.0).argmax(1)
                          for i in range(0, len(xte), 1000)]).numpy()
    return model, float((pred == yte).mean() * 100)
