"""``inspect``: the prunable layers, residual blocks, channel groups and totals of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxprune._version import __version__
from onnxprune.analysis.blocks import Block
from onnxprune.analysis.input_shapes import describe_unknown
from onnxprune.analysis.layers import Layer
from onnxprune.analysis.model import AnalysedModel
from onnxprune.errors import plural
from onnxprune.verbs.loading import InputShapesLike, ModelLike, open_model

__all__ = ["InspectResult", "inspect", "summarise"]


@dataclass
class InspectResult:
    """Prunable layers, residual blocks and totals of a model."""

    layers: list[Layer]
    blocks: list[Block]
    params: int  # every float parameter of the model (BN statistics excluded)
    prunable_params: int  # parameters of the prunable layers (with their bias and BatchNorm)
    flops: int | None  # per sample, 2 per multiply-accumulate, prunable layers only
    fingerprint: str
    opset: int | None
    shape_error: str | None = None
    notes: list[str] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # channel dependency groups (onnxprune.analysis.channels)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the sizes FLOPs were counted at

    def to_dict(self) -> dict:
        return {
            "onnxprune_version": __version__,
            "fingerprint": self.fingerprint,
            "opset": self.opset,
            "input_shapes": self.input_shapes,
            "layers": [layer.to_dict() for layer in self.layers],
            "blocks": [block.to_dict() for block in self.blocks],
            "groups": self.groups,
            "totals": {
                "params": self.params,
                "prunable_params": self.prunable_params,
                "flops": self.flops,
                "layers": len(self.layers),
                "blocks": len(self.blocks),
                "removable_blocks": sum(b.removable for b in self.blocks),
                "channel_groups": len(self.groups),
                "prunable_channel_groups": sum(g["prunable"] for g in self.groups),
            },
            "notes": self.notes,
        }


def inspect(model: ModelLike, input_shapes: InputShapesLike = None) -> InspectResult:
    """Find the prunable layers and residual blocks of ``model`` (a path or an onnx-ir Model), FLOPs at
    ``input_shapes`` (``["images:1,3,640,640"]`` or ``{"images": (1, 3, 640, 640)}``) for the dimensions the
    graph leaves dynamic.

    >>> result = inspect("build/demo/cnn.onnx")  # doctest: +SKIP
    >>> result.to_dict()["totals"]["params"]  # doctest: +SKIP
    """
    am = open_model(model, input_shapes=input_shapes)
    return summarise(am, groups=True)


def summarise(am: AnalysedModel, groups: bool = False, fingerprint: bool = True) -> InspectResult:
    """inspect()'s result for an analysed model; ``groups``: with the channel dependency groups;
    ``fingerprint=False`` leaves it empty (hashing reads every weight)."""
    info = am.info
    notes = []
    if not am.layers:
        notes.append("no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight) found")
    if info.shape_error:
        notes.append(info.shape_error)
    scoped = sorted({layer.scope for layer in am.layers if layer.scope})
    if scoped:
        inner = sum(bool(layer.scope) for layer in am.layers)
        notes.append(f"{plural(inner, 'layer')} inside the bodies of {', '.join(scoped)} (If / Loop / Scan): "
                     "pruned unstructured or N:M, their channels kept; FLOPs count every branch, though one runs "
                     "per call")
    if any(layer.flops is None for layer in am.layers):
        notes.append("FLOPs unknown for layers whose output shape could not be inferred")
    if am.unknown_dims:
        notes.append(f"total FLOPs unknown: they depend on the size of {describe_unknown(am.unknown_dims, am.model)}"
                     f"; the layers' FLOPs count those dimensions as 1")
    return InspectResult(
        layers=am.layers,
        blocks=am.blocks,
        params=am.params,
        prunable_params=sum(layer.params for layer in am.layers),
        flops=am.flops,
        fingerprint=am.fingerprint if fingerprint else "",
        opset=am.model.opset_imports.get(""),
        shape_error=info.shape_error,
        notes=notes,
        groups=am.channel_graph().describe() if groups else [],
        input_shapes=am.shapes_record,
    )
