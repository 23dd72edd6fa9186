"""Graph analysis: shapes and constants, prunable layers, residual blocks, channel groups, and the analysed
model that holds them (each computed once per graph version)."""

from onnxprune.analysis.blocks import Block, find_blocks
from onnxprune.analysis.channels import ChannelGraph, channel_graph
from onnxprune.analysis.graph import GraphInfo, analyse_graph
from onnxprune.analysis.layers import Layer, find_layers
from onnxprune.analysis.model import AnalysedModel

__all__ = ["AnalysedModel", "Block", "ChannelGraph", "GraphInfo", "Layer", "analyse_graph", "channel_graph",
           "find_blocks", "find_layers"]
