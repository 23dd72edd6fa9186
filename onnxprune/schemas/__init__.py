"""JSON Schemas (draft 2020-12) of onnxprune's artefacts (scores, plan, sweep) and of every command's --json
output; tests validate real outputs against them."""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["load"]


def load(name: str) -> dict:
    """The schema ``name`` (scores, plan, sweep, or a command: inspect, eval, score, allocate, apply, prune,
    finetune, report)."""
    return json.loads(resources.files(__package__).joinpath(f"{name}.schema.json").read_text())
