"""The artefacts between commands (scores.json, plan.json, sweep.json): plain, versioned JSON."""

from onnxprune.artefacts.files import check_fingerprint, json_text, read_json, write_json
from onnxprune.artefacts.plan import PLAN_SCHEMA, Plan, load_plan
from onnxprune.artefacts.scores import SCORES_SCHEMA, Scores, curve_drop, load_scores
from onnxprune.artefacts.sweep import SWEEP_SCHEMA, Sweep, load_sweep

__all__ = ["PLAN_SCHEMA", "SCORES_SCHEMA", "SWEEP_SCHEMA", "Plan", "Scores", "Sweep", "check_fingerprint",
           "curve_drop", "json_text", "load_plan", "load_scores", "load_sweep", "read_json", "write_json"]
