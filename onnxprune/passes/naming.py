"""Name every unnamed node, so layers and blocks can be referred to by name in plans and reports."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["NameNodesPass"]


class NameNodesPass(ir.passes.InPlacePass):
    """An unnamed node gets op type + position (``Conv_3``), made unique; named nodes keep their names.
    The same graph always gets the same names."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        used = {n.name for n in graph if n.name}
        modified = False
        for i, node in enumerate(graph):
            if not node.name:
                name = f"{node.op_type}_{i}"
                while name in used:
                    name += "_"
                node.name = name
                used.add(name)
                modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        if not all(n.name for n in model.graph):
            raise ir.passes.PostconditionError("a node is still unnamed")
