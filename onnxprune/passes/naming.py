"""Name every unnamed node, so layers and blocks can be referred to by name in plans and reports."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.analysis.graph import node_bodies

__all__ = ["NameNodesPass"]


class NameNodesPass(ir.passes.InPlacePass):
    """An unnamed node gets op type + position (``Conv_3``; inside If / Loop / Scan bodies the path to it,
    ``If_2/then_branch/Conv_1``), made unique; named nodes keep their names. The same graph always gets the
    same names."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        used = {n.name for n in graph if n.name}
        modified = False
        for i, node in enumerate(graph):
            if not node.name:
                node.name = _unique(f"{node.op_type}_{i}", used)
                modified = True
        # then the nodes inside If / Loop / Scan bodies: NODE/BODY/Op_position (If_2/then_branch/Conv_1)
        used.update(n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name)
        for node in graph:
            modified |= _name_bodies(node, used)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        if not all(n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)):
            raise ir.passes.PostconditionError("a node is still unnamed")


def _name_bodies(node: ir.Node, used: set[str]) -> bool:
    modified = False
    for label, body in node_bodies(node):
        for i, inner in enumerate(body):
            if not inner.name:
                inner.name = _unique(f"{node.name}/{label}/{inner.op_type}_{i}", used)
                modified = True
            modified |= _name_bodies(inner, used)
    return modified


def _unique(name: str, used: set[str]) -> str:
    while name in used:
        name += "_"
    used.add(name)
    return name
