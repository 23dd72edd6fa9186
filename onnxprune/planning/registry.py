"""The planning methods by name: what ``onnxprune allocate --method`` offers, and what each needs.

Add a method (see docs/ARCHITECTURE.md): a rule in onnxprune.planning.allocation (a sparsity function of one
scalar, bisected to the budget) is available for unstructured and channel plans at once; a method that
measures or chooses differently gets its own module and a ``kind`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxprune.planning.allocation import RULES

__all__ = ["LAYER_METHODS", "PLANNERS", "Planner"]


@dataclass(frozen=True)
class Planner:
    name: str
    kind: str  # rule: per-layer sparsities from a formula; measured: searched on data; blocks: blocks to remove
    needs_scores: bool  # reads scores.json (from onnxprune score)
    needs_data: bool
    summary: str


PLANNERS: dict[str, Planner] = {p.name: p for p in (
    Planner("capacity", "rule", True, False, "density proportional to the scored importance"),
    Planner("uniform", "rule", False, False, "the same sparsity in every layer"),
    Planner("global", "rule", False, False, "one magnitude threshold across layers"),
    Planner("lamp", "rule", False, False, "one threshold on layer-adaptive magnitude scores (LAMP)"),
    Planner("erk", "rule", False, False, "Erdos-Renyi-Kernel densities"),
    Planner("sensitivity", "rule", True, False, "least total measured drop (convex hulls of the curves)"),
    Planner("search", "measured", False, True, "a (1+1) search over whole pruned models on calibration data"),
    Planner("srinit", "blocks", True, False, "residual blocks least sensitive to re-initialisation (SR-init)"),
)}
assert {p.name for p in PLANNERS.values() if p.kind == "rule"} == set(RULES)

# The methods that give every layer a sparsity (all but block removal): prune and sweep choose among these.
LAYER_METHODS = tuple(name for name, p in PLANNERS.items() if p.kind != "blocks")
