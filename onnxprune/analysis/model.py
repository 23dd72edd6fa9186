"""The analysed model: one loaded graph and everything the analyses know about it, each computed once.

Verbs pass an ``AnalysedModel`` around instead of a path or a bare ``ir.Model``, so that shape inference
(``analyse_graph``), layer and block discovery, the channel dependency graph and the full weight fingerprint
run once per graph version, whichever verbs a command chains. A rewrite makes a new graph version: build a
new ``AnalysedModel`` of the rewritten model (``after_rewrite``), never reuse the old one's facts.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import onnx_ir as ir

from onnxprune.analysis.blocks import Block, find_blocks
from onnxprune.analysis.channels import ChannelGraph, channel_graph
from onnxprune.analysis.graph import GraphInfo, analyse_graph
from onnxprune.analysis.input_shapes import InputShapes, describe_unknown, shapes_record, unknown_dims
from onnxprune.analysis.layers import Layer, find_layers, model_params
from onnxprune.errors import InputError
from onnxprune.io import fingerprint as weight_fingerprint

__all__ = ["AnalysedModel"]


class AnalysedModel:
    """``model`` (its nodes named, see onnxprune.passes.NameNodesPass) and, computed on first use: ``info``
    (shapes, constants), ``layers``, ``blocks``, ``channel_graph()``, ``fingerprint``, ``params``, ``flops``.
    ``path``: the file it was loaded from, if any. ``input_shapes``: the sizes of inputs whose dimensions
    the graph leaves dynamic (onnxprune.analysis.input_shapes); every shape and FLOP count is at them."""

    def __init__(self, model: ir.Model, path: Path | None = None, input_shapes: InputShapes | None = None):
        self.model = model
        self.path = path
        self.input_shapes: InputShapes = dict(input_shapes or {})
        self._channel_graphs: dict[str, ChannelGraph] = {}

    def after_rewrite(self) -> AnalysedModel:
        """The same (now rewritten) model with nothing computed yet: the next graph version."""
        return AnalysedModel(self.model, self.path, self.input_shapes)

    def at_shapes(self, input_shapes: InputShapes) -> AnalysedModel:
        """This model analysed at other input sizes (itself when they are the ones it has)."""
        if input_shapes == self.input_shapes:
            return self
        other = AnalysedModel(self.model, self.path, input_shapes)
        if "fingerprint" in self.__dict__:
            other.fingerprint = self.fingerprint  # the weights are the same
        return other

    @cached_property
    def info(self) -> GraphInfo:
        return analyse_graph(self.model, self.input_shapes)

    @cached_property
    def layers(self) -> list[Layer]:
        return find_layers(self.info)

    @cached_property
    def blocks(self) -> list[Block]:
        return find_blocks(self.info, self.layers)

    @cached_property
    def fingerprint(self) -> str:
        """The hash of the graph and every weight (onnxprune.io.fingerprint) that artefacts record."""
        return weight_fingerprint(self.model)

    @cached_property
    def params(self) -> int:
        """Every float parameter of the model (BatchNorm statistics excluded)."""
        return model_params(self.info)

    @property
    def flops(self) -> int | None:
        """FLOPs per sample of the prunable layers; None when some layer's could not be inferred, or depend on
        an input size that is unknown (``unknown_dims``: each layer's then counts such a dimension as 1)."""
        flops = [layer.flops for layer in self.layers]
        return None if self.unknown_dims or any(f is None for f in flops) else int(sum(flops))

    @property
    def owned_layers(self) -> list[Layer]:
        """Layers with their own weight: a weight shared by several nodes belongs to its first user."""
        return [layer for layer in self.layers if not layer.shared_with]

    @cached_property
    def shared_flops(self) -> dict[str, int]:
        """Owner layer name -> the FLOPs of the other layers that use its weight."""
        extra: dict[str, int] = {}
        for layer in self.layers:
            if layer.shared_with:
                extra[layer.shared_with] = extra.get(layer.shared_with, 0) + (layer.flops or 0)
        return extra

    def weight_flops(self, layer: Layer) -> int:
        """FLOPs of every layer using ``layer``'s weight (what pruning that weight saves)."""
        return (layer.flops or 0) + self.shared_flops.get(layer.name, 0)

    def channel_graph(self, coupled: str = "prune") -> ChannelGraph:
        """The channel dependency graph; ``coupled="keep"`` with every multi-producer group blocked."""
        if coupled not in self._channel_graphs:
            cg = channel_graph(self.info, self.layers)
            if coupled == "keep":
                cg.keep_coupled()
            self._channel_graphs[coupled] = cg
        return self._channel_graphs[coupled]

    @cached_property
    def unknown_dims(self):
        """Input dimensions after the batch that neither the graph nor ``input_shapes`` fix."""
        return unknown_dims(self.model, self.input_shapes)

    def require_input_sizes(self, what: str) -> None:
        """Refuse (InputError) to compute ``what`` (e.g. "FLOPs") while an input dimension is unknown, instead
        of computing it at a made-up size."""
        missing = self.unknown_dims
        if missing:
            raise InputError(f"{what} depend on the size of {describe_unknown(missing, self.model)}")

    @property
    def shapes_record(self) -> dict[str, list[int]]:
        """The input sizes an artefact made from this model records (later steps reuse them)."""
        return shapes_record(self.input_shapes)
