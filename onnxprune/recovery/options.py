"""Options of ``onnxprune finetune`` (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxprune.errors import InputError

__all__ = ["AUGMENTATIONS", "INSERT_BN", "FinetuneOptions"]

AUGMENTATIONS = ("auto", "flip", "crop")  # auto: flip for image inputs (N, C, H, W), nothing otherwise
INSERT_BN = ("auto", "always", "never")  # BatchNorm after convolutions for training: auto = when the graph has none


@dataclass
class FinetuneOptions:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: tuple[str, ...] = ("auto",)
    labels: bool = True  # use the labels (cross-entropy)
    temperature: float = 4.0
    label_weight: float = 0.5  # weight of the cross-entropy when distilling too (the KL term gets 1 - it)
    insert_bn: str = "auto"  # auto (when the graph has no BatchNormalization) | always | never
    recalibrate: bool = True  # re-estimate BatchNorm statistics before training
    calibration: int = 2048  # samples for the statistics
    keep_zeros: bool = True  # zero weights of Conv/Gemm/MatMul stay zero (unstructured plans)
    max_minutes: float | None = None  # wall-clock budget of the whole run (teacher cache, calibration, training;
    # per-epoch evaluations excluded); the cosine schedule is stretched to it
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        if self.epochs < 0:
            raise InputError(f"--epochs must be at least 0, got {self.epochs}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 2:
            raise InputError(f"--batch-size must be at least 2 for training with BatchNorm, got {self.batch_size}")
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise InputError(f"unknown augmentation(s) {', '.join(bad)}; use a comma list of {', '.join(AUGMENTATIONS)}")
        if self.insert_bn not in INSERT_BN:
            raise InputError(f"--insert-bn must be auto, always or never, got {self.insert_bn!r}")
        if not self.temperature > 0:
            raise InputError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.label_weight <= 1:
            raise InputError(f"--label-weight must be in [0, 1], got {self.label_weight}")
        if self.calibration < 1:
            raise InputError(f"--calibration must be at least 1, got {self.calibration}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"--max-minutes must be positive, got {self.max_minutes}")
