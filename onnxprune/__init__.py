"""onnxprune: prune ONNX models (layer-wise sparsity from capacity, SR-init block removal), with proof.

Python API (the same verbs as the CLI)::

    import onnxprune
    info = onnxprune.inspect("model.onnx")          # layers, blocks, totals
    scores = onnxprune.score("model.onnx")          # capacity (or sensitivity with data=...)
    plan = onnxprune.allocate("model.onnx", target_sparsity=0.7, method="lamp")
    onnxprune.apply("model.onnx", plan, "pruned.onnx")
    res = onnxprune.eval("pruned.onnx", "data.npz")  # top-1 / top-5 / throughput
    res = onnxprune.prune("model.onnx", "small.onnx", target_flops=0.5, data="calib.npz")  # all in one
    sw = onnxprune.sweep("model.onnx", "data.npz", sparsities=(0.5, 0.7), methods=("uniform", "lamp"))
    onnxprune.report("report.html", scores=scores, plan=plan, sweep=sw)  # needs onnxprune[report]
    onnxprune.finetune("pruned.onnx", "train.npz", "tuned.onnx", teacher="model.onnx",
                       options=onnxprune.FinetuneOptions(epochs=10))  # needs onnxprune[torch]
"""

from onnxprune._version import __version__
from onnxprune.api import (
    ApplyResult,
    EvalResult,
    FinetuneResult,
    InspectResult,
    allocate,
    apply,
    evaluate,
    finetune,
    inspect,
    report,
    score,
)
from onnxprune.artefacts import Plan, Scores, Sweep
from onnxprune.errors import InputError, OnnxpruneError
from onnxprune.recovery.options import FinetuneOptions
from onnxprune.workflows import ModelStats, PruneResult, prune, sweep

eval = evaluate  # noqa: A001 - the CLI verb's name, as the API mirrors the CLI

__all__ = [
    "ApplyResult", "EvalResult", "FinetuneOptions", "FinetuneResult", "InputError", "InspectResult", "ModelStats",
    "OnnxpruneError", "Plan", "PruneResult", "Scores", "Sweep", "__version__",
    "allocate", "apply", "eval", "evaluate", "finetune", "inspect", "prune", "report", "score", "sweep",
]
