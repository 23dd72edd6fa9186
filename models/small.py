"""Small reference networks trainable in seconds on scikit-learn's bundled digits (8x8 grey, 10 classes):
a VGG-style plain CNN, an MLP, a transformer classifier in pre-norm and post-norm form, and a small ResNet
with projection (option-B) shortcuts."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PlainCNN(nn.Module):
    """VGG-style: conv-BN-ReLU stacks, max-pooling, Flatten -> Linear -> Linear."""

    def __init__(self, width: int = 16, num_classes: int = 10, image_size: int = 8):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (image_size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention written with plain matmuls (exports as MatMul/Softmax)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:  # x + f(LN(x))
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))  # LN(x + f(x))
        return self.norm2(x + self.mlp(x))


class TransformerClassifier(nn.Module):
    """The 8x8 image as 8 tokens (rows) of 8 pixels; learned position embedding; mean pooling."""

    def __init__(self, pre_norm: bool = True, dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, hidden, pre_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(self.norm(tokens).mean(dim=1))


class ProjectionBlock(nn.Module):
    """A ResNet BasicBlock with an option-B shortcut: 1x1 conv + BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNetB(nn.Module):
    """Stem, then blocks 16 -> 16 (identity), 16 -> 32 stride 2 (projection), 32 -> 32 (identity)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(ProjectionBlock(16, 16, 1), ProjectionBlock(16, 32, 2), ProjectionBlock(32, 32, 1))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


SMALL_MODELS = {
    "resnet-proj": lambda: SmallResNetB(),
    "cnn": lambda: PlainCNN(),
    "mlp": lambda: MLP(),
    "transformer-pre": lambda: TransformerClassifier(pre_norm=True),
    "transformer-post": lambda: TransformerClassifier(pre_norm=False),
}


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images N x 1 x 8 x 8 (0..255), split 1400 train / 397 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def fit(model: nn.Module, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, *, epochs: int,
        lr: float, batch_size: int, seed: int) -> float:
    """Train ``model`` on uint8 images (scaled to [0, 1]) with Adam and cross-entropy; returns its top-1 (%) on
    the test images, leaving it in eval mode."""
    xt = torch.from_numpy(xtr).float() / 255.0
    yt = torch.from_numpy(ytr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(xte[i:i + 1000]).float() / 255.0).argmax(1)
                          for i in range(0, len(xte), 1000)]).numpy()
    return float((pred == yte).mean() * 100)


def train_small(name: str, epochs: int = 30, seed: int = 0) -> tuple[nn.Module, float]:
    """Train a small model on the digits train split; returns the model (eval mode) and its test top-1 (%)."""
    torch.manual_seed(seed)
    model = SMALL_MODELS[name]()
    xtr, ytr, xte, yte = digits_split(seed)
    return model, fit(model, xtr, ytr, xte, yte, epochs=epochs, lr=3e-3, batch_size=64, seed=seed)
