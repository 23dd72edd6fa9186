"""Remove whole residual blocks: keep only the skip path (SR-init's removal rule).

For each block, the joining Add is bypassed: every consumer of its output reads the skip value instead (an
Identity keeps the name when the Add's output is a graph output), then dead-code elimination drops the
branch's nodes and their weights. Only blocks that discovery marked removable (shapes still hold, nothing
else reads the branch) are accepted.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.analysis.blocks import FUSED_RESIDUAL_OPS, Block
from onnxprune.errors import InputError

__all__ = ["RemoveBlocksPass"]


class RemoveBlocksPass(ir.passes.InPlacePass):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        for block in blocks:
            if not block.removable:
                raise InputError(f"block {block.name!r} cannot be removed: {block.reason}")
        self.blocks = blocks

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        for block in self.blocks:
            add = nodes.get(block.name)
            if add is None:
                raise InputError(f"block {block.name!r} is not in the model; make a new plan")
            skip = add.inputs[1 - block.branch_input]
            if add.op_type in FUSED_RESIDUAL_OPS:
                _unfuse(graph, add, skip)
                continue
            out = add.outputs[0]
            if out in graph.outputs:
                identity = ir.node("Identity", [skip], name=f"{add.name}_skip")
                graph.insert_before(add, identity)
                out.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
                graph.remove(add, safe=True)
                identity.outputs[0].name = out.name
            else:
                out.replace_all_uses_with(skip)
                graph.remove(add, safe=True)
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.blocks))

    def ensures(self, model: ir.Model) -> None:
        """The joining Add of every removed block is gone."""
        left = {node.name for node in model.graph} & {block.name for block in self.blocks}
        if left:
            raise ir.passes.PostconditionError(f"blocks still joined after removal: {sorted(left)[:3]}")


_PLAIN_NORM = {"SkipLayerNormalization": ("LayerNormalization", ""),
               "SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", "")}


def _unfuse(graph: ir.Graph, join: ir.Node, skip: ir.Value) -> None:
    """A fused Skip*Normalization without its branch: the same normalisation of the skip path alone
    (LayerNormalization, or ONNX Runtime's SimplifiedLayerNormalization), keeping the output names; its
    residual-sum output (4th, when used) becomes the skip value."""
    op, domain = _PLAIN_NORM[join.op_type]
    scale = join.inputs[2]
    bias = join.inputs[3] if join.op_type == "SkipLayerNormalization" and len(join.inputs) > 3 else None
    epsilon = join.attributes.get_float("epsilon", 1e-5)
    norm = ir.node(op, [skip, scale] + ([bias] if bias is not None else []), domain=domain,
                   attributes={"axis": -1, "epsilon": epsilon}, name=f"{join.name}_skip_only")
    graph.insert_before(join, norm)
    out = join.outputs[0]
    out.replace_all_uses_with(norm.outputs[0], replace_graph_outputs=True)
    if len(join.outputs) > 3 and join.outputs[3].uses():
        join.outputs[3].replace_all_uses_with(skip, replace_graph_outputs=True)
    name = out.name
    graph.remove(join, safe=True)
    norm.outputs[0].name = name
