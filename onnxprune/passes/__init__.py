"""Graph rewrites, each an onnx-ir pass, and the one way to run a sequence of them.

- NameNodesPass: name unnamed nodes (every model is named once, when a verb opens it)
- HoistBodyWeightsPass: If / Loop / Scan bodies' initializers moved to the main graph (also when opened)
- SparsifyPass: unstructured or N:M zeros per layer
- RemoveBlocksPass: residual blocks bypassed (SR-init)
- RefitPass, ShrinkChannelsPass: calibrated channel removal (refit the consumers, then shrink)
- ProvenancePass: what made the model, in its metadata
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.errors import OnnxpruneError
from onnxprune.passes.hoist import HoistBodyWeightsPass
from onnxprune.passes.naming import NameNodesPass
from onnxprune.passes.provenance import ProvenancePass
from onnxprune.passes.reconstruct import RefitPass
from onnxprune.passes.remove_blocks import RemoveBlocksPass
from onnxprune.passes.shrink import ShrinkChannelsPass
from onnxprune.passes.sparsify import SparsifyPass

__all__ = ["HoistBodyWeightsPass", "NameNodesPass", "ProvenancePass", "RefitPass", "RemoveBlocksPass", "ShrinkChannelsPass",
           "SparsifyPass", "run_passes"]


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> ir.passes.PassResult:
    """Run ``passes`` in order with onnx-ir's pass manager (each pass's requires / ensures checked). A bad
    input found by a pass (an OnnxpruneError) surfaces as itself, not wrapped in the manager's PassError."""
    try:
        return ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, OnnxpruneError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
