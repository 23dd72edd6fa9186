"""The scoring methods by name: what ``onnxprune score --method`` offers. Add a method here (see
docs/ARCHITECTURE.md): a ``check(request)`` that refuses bad options before any work, and a
``run(analysed model, request, progress) -> Scores``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Scores
from onnxprune.scoring import capacity, influence, sensitivity, srinit
from onnxprune.scoring.common import Progress, ScoreRequest

__all__ = ["SCORERS", "Scorer"]


@dataclass(frozen=True)
class Scorer:
    name: str
    needs_data: bool
    check: Callable[[ScoreRequest], None]
    run: Callable[[AnalysedModel, ScoreRequest, Progress | None], Scores]
    summary: str


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("capacity", False, capacity.check, capacity.score_capacity,
           "data-free capacity of each weight tensor (metric / max over layers)"),
    Scorer("sensitivity", True, sensitivity.check_sensitivity, sensitivity.score_sensitivity,
           "output drop with one layer magnitude-pruned, over a grid of sparsities"),
    Scorer("compactness", True, sensitivity.check_compactness, sensitivity.score_compactness,
           "highest sparsity of each layer alone within a tolerance"),
    Scorer("srinit", True, srinit.check, srinit.score_srinit,
           "drop when a block's (or layer's) weights are re-initialised (SR-init)"),
    Scorer("influence", True, influence.check, influence.score_influence,
           "block influence: 1 - cosine between a block's input and output (ShortGPT), one run of the data"),
)}
