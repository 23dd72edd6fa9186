"""The onnxprune verbs as Python functions: a facade over onnxprune.verbs (one module per verb), with the
result types and the choices every front end offers. The CLI only parses options and prints what these return.

    from onnxprune import api
    scores = api.score("model.onnx")                        # Scores
    plan = api.allocate("model.onnx", target_sparsity=0.7, method="lamp", scores=scores)   # Plan
    api.apply("model.onnx", plan, "pruned.onnx")            # ApplyResult
"""

from __future__ import annotations

from onnxprune.analysis.layers import find_layers
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan, Scores, Sweep, json_text, load_plan, load_scores, load_sweep, write_json
from onnxprune.io import check_output_path
from onnxprune.planning.channel_selection import CRITERIA
from onnxprune.planning.registry import LAYER_METHODS, PLANNERS
from onnxprune.recovery.options import INSERT_BN, FinetuneOptions
from onnxprune.runtime.backend import BACKENDS, Backend
from onnxprune.runtime.data import DataSpec, parse_floats, parse_size
from onnxprune.runtime.input_values import parse_input_values
from onnxprune.runtime.session import PROVIDERS
from onnxprune.scoring.capacity import DEFAULT_METRIC as DEFAULT_CAPACITY_METRIC
from onnxprune.scoring.capacity import METRICS as _CAPACITY_METRICS
from onnxprune.scoring.registry import SCORERS
from onnxprune.scoring.sensitivity import METRICS as SENSITIVITY_METRICS
from onnxprune.scoring.srinit import METRICS as SRINIT_METRICS
from onnxprune.scoring.srinit import UNIT_KINDS as SRINIT_UNITS
from onnxprune.verbs.allocate import allocate
from onnxprune.verbs.apply import APPLY_CRITERIA, GRANULARITIES, WEIGHT_CRITERIA, ApplyResult, apply, check_runs
from onnxprune.verbs.evaluate import TASKS as EVAL_TASKS
from onnxprune.verbs.evaluate import EvalResult, LanguageModelResult, evaluate
from onnxprune.verbs.finetune import FinetuneResult, finetune
from onnxprune.verbs.inspect import InspectResult, inspect
from onnxprune.verbs.loading import ModelLike, open_model
from onnxprune.verbs.report import write_report as report
from onnxprune.verbs.score import score

# The choices every front end offers (the CLI reads its option choices from here).
SCORE_METHODS = tuple(SCORERS)
ALLOCATION_METHODS = tuple(PLANNERS)
CAPACITY_METRICS = tuple(_CAPACITY_METRICS)
ALLOCATION_GRANULARITIES = ("unstructured", "channel")
BUDGETS = ("params", "flops")
COUPLED = ("prune", "keep")
STORES = ("dense", "sparse")

__all__ = [
    "ALLOCATION_GRANULARITIES", "ALLOCATION_METHODS", "BUDGETS", "CAPACITY_METRICS", "COUPLED", "CRITERIA",
    "DEFAULT_CAPACITY_METRIC", "GRANULARITIES", "INSERT_BN", "LAYER_METHODS", "PROVIDERS", "SCORE_METHODS",
    "SENSITIVITY_METRICS", "SRINIT_METRICS", "SRINIT_UNITS", "STORES", "EVAL_TASKS", "LanguageModelResult",
    "APPLY_CRITERIA", "WEIGHT_CRITERIA", "BACKENDS",
    "AnalysedModel", "ApplyResult", "Backend", "DataSpec", "EvalResult", "FinetuneOptions", "FinetuneResult",
    "InspectResult", "ModelLike", "Plan", "Scores", "Sweep",
    "allocate", "apply", "check_output_path", "check_runs", "evaluate", "find_layers", "finetune", "inspect",
    "json_text", "load_plan", "load_scores", "load_sweep", "open_model", "parse_floats", "parse_input_values", "parse_size", "report",
    "score", "write_json",
]
