"""plan.json: what to prune (a sparsity per layer and/or blocks to remove), as ``onnxprune allocate`` writes it.

Plain, versioned JSON a person can read and edit. It records the fingerprint of the model it was made for,
so that ``apply`` refuses a plan made for another model (unless forced).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from onnxprune._version import __version__
from onnxprune.artefacts.files import check_schema, read_input_shapes, read_json
from onnxprune.errors import InputError

__all__ = ["PLAN_SCHEMA", "Plan", "load_plan"]

PLAN_SCHEMA = "onnxprune.plan/1"


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
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the sizes it was made at (apply reuses)

    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "onnxprune_version": __version__,
            "method": self.method,
            "seed": self.seed,
            "budget": self.budget,
            "granularity": self.granularity,
            "model_fingerprint": self.fingerprint,
            "input_shapes": self.input_shapes,
            "options": self.options,
            "totals": self.totals,
            "layers": self.layers,
            "blocks": self.blocks,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        check_schema(d, PLAN_SCHEMA, source)
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
                   options=d.get("options") or {}, seed=d.get("seed"),
                   input_shapes=read_input_shapes(d, source))

    def sparsities(self) -> dict[str, float]:
        return {entry["name"]: float(entry["sparsity"]) for entry in self.layers}


def load_plan(path: str | os.PathLike) -> Plan:
    return Plan.from_dict(read_json(path, "plan"), str(path))


