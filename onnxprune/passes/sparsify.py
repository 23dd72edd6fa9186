"""Unstructured and N:M weight sparsity, applied to the weight tensors in the graph.

- unstructured: in each layer, the ``zeros`` lowest-magnitude weights become 0 (ties broken by position,
  so the result is reproducible).
- n:m: in every group of M consecutive weights along the layer's input (reduction) dimension, the N of
  largest magnitude are kept (the 2:4 pattern of sparse tensor cores). Layers whose input dimension is not
  a multiple of M are left dense and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.layers import Layer
from onnxprune.tensors.masks import apply_mask, magnitude_mask, nm_mask
from onnxprune.tensors.nbits import is_nbits
from onnxprune.tensors.weights import get_weight, lazy_from, out_in_axes, set_weight

__all__ = ["SparsifyPass", "SparsifyReport"]


@dataclass
class SparsifyReport:
    zeros: dict[str, int] = field(default_factory=dict)  # weights set to zero by the mask, per layer
    sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed dense


class SparsifyPass(ir.passes.InPlacePass):
    """Zero weights per layer: ``targets`` maps layer name -> number of weights to zero (unstructured), or
    for ``nm=(n, m)`` the layers to give the N:M pattern (their counts are ignored)."""

    def __init__(self, layers: list[Layer], targets: dict[str, int], nm: tuple[int, int] | None = None):
        super().__init__()
        self.layers = [layer for layer in layers if layer.name in targets]
        self.targets = targets
        self.nm = nm
        self.report = SparsifyReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for layer in self.layers:
            w = get_weight(layer)
            self.report.sizes[layer.name] = int(w.size)
            if self.targets[layer.name] <= 0:
                self.report.zeros[layer.name] = 0
                continue
            in_axis = out_in_axes(layer)[1]
            if self.nm is not None and w.shape[in_axis] % self.nm[1]:
                self.report.skipped[layer.name] = f"input dimension {w.shape[in_axis]} is not a multiple of {self.nm[1]}"
                self.report.zeros[layer.name] = 0
                continue
            mask_of = (lambda a, k=self.targets[layer.name]: magnitude_mask(a, k)) if self.nm is None else \
                (lambda a, ax=in_axis: nm_mask(a, *self.nm, ax))
            source = layer.node.inputs[layer.weight_input].const_value
            if isinstance(source, ir.ExternalTensor) and not is_nbits(layer.node):
                # memory-mapped weights (big models): computed while the model is written, one layer at a
                # time, so the pruned model never sits in memory beside the mapped original
                set_weight(layer, lazy_from(source, lambda a, f=mask_of: apply_mask(a, f(a))))
                n, m = self.nm or (0, 1)
                self.report.zeros[layer.name] = self.targets[layer.name] if self.nm is None else w.size // m * (m - n)
            else:
                mask = mask_of(w)
                set_weight(layer, apply_mask(w, mask))
                self.report.zeros[layer.name] = int(mask.size - np.count_nonzero(mask))
            modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        """Unstructured: every layer got exactly its planned number of zeros."""
        if self.nm is None and any(self.report.zeros[layer.name] != self.targets[layer.name]
                                   for layer in self.layers):
            raise ir.passes.PostconditionError("zeroed weights differ from the plan's counts")
