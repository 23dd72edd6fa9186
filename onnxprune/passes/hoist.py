"""Move the initializers of If / Loop / Scan bodies into the main graph, where every analysis, score and
rewrite finds weights. The bodies still read them (a body sees the values of the scopes around it), so the
model computes the same; some exporters keep a branch's weights in its body, others in the main graph."""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.analysis.graph import node_bodies

__all__ = ["HoistBodyWeightsPass"]


class HoistBodyWeightsPass(ir.passes.InPlacePass):
    """Every initializer of a body (at any depth) becomes an initializer of the main graph, unless its name
    is taken there."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(main):
            for _, body in node_bodies(node):
                for name in list(body.initializers):
                    if name in main.initializers:
                        continue
                    value = body.initializers.pop(name)
                    main.register_initializer(value)
                    modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for _, body in node_bodies(node):
                if any(name not in model.graph.initializers for name in body.initializers):
                    raise ir.passes.PostconditionError(f"a body of {node.name!r} still holds its own weights")
