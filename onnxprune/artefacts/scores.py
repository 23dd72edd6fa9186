"""scores.json: per-layer (or per-block) importance, as ``onnxprune score`` writes it.

Plain, versioned JSON a person can read and edit. It records the fingerprint of the model it was made for,
so that ``allocate`` refuses scores made for another model (unless forced).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from onnxprune._version import __version__
from onnxprune.artefacts.files import check_schema, read_input_shapes, read_json
from onnxprune.errors import InputError

__all__ = ["SCORES_SCHEMA", "Scores", "curve_drop", "load_scores"]

SCORES_SCHEMA = "onnxprune.scores/1"


@dataclass
class Scores:
    """Per-layer (or per-block) scores: ``units`` is a list of dicts with at least name and importance."""

    method: str
    fingerprint: str
    units: list[dict[str, Any]]
    metric: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    unit_kind: str = "layers"  # layers | blocks
    seed: int | None = None  # the first seed of a random method, None for deterministic ones
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the sizes it was measured at
    # Wall times: reported by the CLI (and its --json), never written to scores.json, which is byte-identical
    # for the same model, data, options and seed.
    timing: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "schema": SCORES_SCHEMA,
            "onnxprune_version": __version__,
            "method": self.method,
            "metric": self.metric,
            "unit_kind": self.unit_kind,
            "seed": self.seed,
            "model_fingerprint": self.fingerprint,
            "input_shapes": self.input_shapes,
            "options": self.options,
            "units": self.units,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "scores") -> Scores:
        check_schema(d, SCORES_SCHEMA, source)
        units = d.get("units")
        if not isinstance(units, list) or not all(isinstance(u, dict) and "name" in u for u in units):
            raise InputError(f"{source}: 'units' must be a list of objects with a 'name'; re-run onnxprune score")
        return cls(method=str(d.get("method")), fingerprint=str(d.get("model_fingerprint")), units=units,
                   metric=d.get("metric"), options=d.get("options") or {}, unit_kind=d.get("unit_kind", "layers"),
                   seed=d.get("seed"), input_shapes=read_input_shapes(d, source))

    def by_name(self) -> dict[str, dict]:
        return {u["name"]: u for u in self.units}

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """Sensitivity scores as (sparsity, drop) points per layer, the drop in the scores' own metric."""
        base = self.options.get("reference", {})
        return {u["name"]: [(float(p["sparsity"]), curve_drop(p, base, self.metric or "kl")) for p in u["curve"]]
                for u in self.units}


def curve_drop(point: dict, base: dict, metric: str) -> float:
    """The drop a curve point records for ``metric`` (bigger = worse)."""
    if metric == "kl":
        return float(point["kl"])
    if metric == "agreement":
        return 100.0 - float(point["agreement"])
    if metric == "error":
        return float(point["error"])
    return float(base["top1"]) - float(point["top1"])


def load_scores(path: str | os.PathLike) -> Scores:
    return Scores.from_dict(read_json(path, "scores"), str(path))


