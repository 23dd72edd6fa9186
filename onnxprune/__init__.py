"""onnxprune: prune ONNX models (layer-wise sparsity from capacity, SR-init block removal), with proof.

Python API (the same verbs as the CLI)::

    import onnxprune
    info = onnxprune.inspect("model.onnx")          # layers, blocks, totals
    res = onnxprune.eval("model.onnx", "data.npz")   # top-1 / top-5 / throughput
"""

__version__ = "0.1.0"

from onnxprune.api import EvalResult, InspectResult, evaluate, inspect  # noqa: E402
from onnxprune.errors import InputError, OnnxpruneError  # noqa: E402

eval = evaluate  # noqa: A001 - the CLI verb's name, as the API mirrors the CLI

__all__ = ["EvalResult", "InputError", "InspectResult", "OnnxpruneError", "eval", "evaluate", "inspect", "__version__"]
