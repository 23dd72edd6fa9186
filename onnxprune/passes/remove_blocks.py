"""Remove whole residual blocks: keep only the skip path (SR-init's removal rule).

For each block, the joining Add is bypassed: every consumer of its output reads the skip value instead (an
Identity keeps the name when the Add's output is a graph output), then dead-code elimination drops the
branch's nodes and their weights. Only blocks that discovery marked removable (shapes still hold, nothing
else reads the branch) are accepted.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.analysis.blocks import Block
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
