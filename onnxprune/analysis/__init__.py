"""Graph analysis: prunable layers, residual blocks (and later channel groups)."""

from onnxprune.analysis.blocks import Block, find_blocks
from onnxprune.analysis.graph import GraphInfo, analyse_graph
from onnxprune.analysis.layers import Layer, find_layers

__all__ = ["Block", "GraphInfo", "Layer", "analyse_graph", "find_blocks", "find_layers"]
