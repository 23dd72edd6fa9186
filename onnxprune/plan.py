"""The artefacts between commands: scores.json and plan.json.

Plain, versioned JSON a person can read and edit. Each records the fingerprint of the model it was made
for, so that ``allocate`` and ``apply`` refuse artefacts made for another model (unless forced).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune import __version__
from onnxprune.errors import InputError

SCORES_SCHEMA = "onnxprune.scores/1"
PLAN_SCHEMA = "onnxprune.plan/1"


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
            "options": self.options,
            "units": self.units,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "scores") -> Scores:
        _check_schema(d, SCORES_SCHEMA, source)
        units = d.get("units")
        if not isinstance(units, list) or not all(isinstance(u, dict) and "name" in u for u in units):
            raise InputError(f"{source}: 'units' must be a list of objects with a 'name'; re-run onnxprune score")
        return cls(method=str(d.get("method")), fingerprint=str(d.get("model_fingerprint")), units=units,
                   metric=d.get("metric"), options=d.get("options") or {}, unit_kind=d.get("unit_kind", "layers"),
                   seed=d.get("seed"))

    def by_name(self) -> dict[str, dict]:
        return {u["name"]: u for u in self.units}


@dataclass
class Plan:
    """What to prune: a sparsity per layer (``layers``) and/or blocks to remove (``blocks``)."""

    method: str
    fingerprint: str
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    budget: str = "params"
    granularity: str = "unstructured"
    blocks: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # search's seed; None for the deterministic methods

    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "onnxprune_version": __version__,
            "method": self.method,
            "seed": self.seed,
            "budget": self.budget,
            "granularity": self.granularity,
            "model_fingerprint": self.fingerprint,
            "options": self.options,
            "totals": self.totals,
            "layers": self.layers,
            "blocks": self.blocks,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        _check_schema(d, PLAN_SCHEMA, source)
        layers = d.get("layers", [])
        if not isinstance(layers, list):
            raise InputError(f"{source}: 'layers' must be a list; re-run onnxprune allocate")
        for entry in layers:
            if not isinstance(entry, dict) or "name" not in entry or "sparsity" not in entry:
                raise InputError(f"{source}: every layer needs 'name' and 'sparsity'; got {str(entry)[:80]}")
            s = entry["sparsity"]
            if not isinstance(s, int | float) or isinstance(s, bool) or not 0.0 <= s < 1.0:
                raise InputError(f"{source}: layer {entry['name']!r} has sparsity {s!r}; it must be in [0, 1)")
        blocks = d.get("blocks") or []
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and "name" in b for b in blocks):
            raise InputError(f"{source}: 'blocks' must be a list of objects with a 'name'; re-run onnxprune allocate")
        return cls(method=str(d.get("method")), fingerprint=str(d.get("model_fingerprint")), layers=layers,
                   totals=d.get("totals") or {}, budget=d.get("budget", "params"),
                   granularity=d.get("granularity", "unstructured"), blocks=d.get("blocks") or [],
                   options=d.get("options") or {}, seed=d.get("seed"))

    def sparsities(self) -> dict[str, float]:
        return {entry["name"]: float(entry["sparsity"]) for entry in self.layers}


def _check_schema(d: Any, schema: str, source: str) -> None:
    if not isinstance(d, dict):
        raise InputError(f"{source} is not a JSON object; give a file written by onnxprune")
    found = d.get("schema")
    if found != schema:
        raise InputError(f"{source} has schema {found!r}, expected {schema!r}; give a file written by onnxprune")


def read_json(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p} is not valid JSON ({exc}); give a {what} file written by onnxprune") from exc


def load_scores(path: str | os.PathLike) -> Scores:
    return Scores.from_dict(read_json(path, "scores"), str(path))


def load_plan(path: str | os.PathLike) -> Plan:
    return Plan.from_dict(read_json(path, "plan"), str(path))


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Atomic write (temporary file in the same folder, then rename); keys in a stable order."""
    from onnxprune.io import write_text

    return write_text(path, json.dumps(obj, indent=2) + "\n")


def check_fingerprint(artefact_fp: str, model_fp: str, what: str, force: bool) -> None:
    if artefact_fp != model_fp and not force:
        raise InputError(
            f"the {what} was made for another model (fingerprint {artefact_fp[:12]}..., this model "
            f"{model_fp[:12]}...); make a new {what} for this model, or pass --force"
        )
