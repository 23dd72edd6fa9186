"""Remove whole residual blocks: keep only the skip path (SR-init's removal rule).

For each block, the joining Add is bypassed: every consumer of its output reads the skip value instead (an
Identity keeps the name when the Add's output is a graph output), then dead-code elimination drops the
branch's nodes and their weights. Only blocks that discovery marked removable (shapes still hold, nothing
else reads the branch) are accepted.

A block with a KV cache loses its past inputs and present outputs too. Readers of a removed past input that
only take its shape (a causal mask sized from layer 0's cache) read a kept past input of the same declared
shape instead. Cache names numbered 0..n-1 in the model (``past_key_values.%d.key``, ``present.%d.value``:
ONNX Runtime GenAI builds them from a template and the layer count) are renumbered to stay contiguous.
"""

from __future__ import annotations

import re

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxprune.analysis.blocks import FUSED_RESIDUAL_OPS, Block
from onnxprune.errors import InputError

__all__ = ["RemoveBlocksPass", "renumbered"]


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
        input_names = [v.name for v in graph.inputs]
        output_names = [v.name for v in graph.outputs]
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
        dropped = {name for block in self.blocks for name in block.cache_outputs}
        for value in [v for v in graph.outputs if v.name in dropped]:
            graph.outputs.remove(value)
        RemoveUnusedNodesPass()(model)  # the present outputs' producers go, so only shape readers remain
        _drop_cache_inputs(graph, {name for block in self.blocks for name in block.cache_inputs})
        RemoveUnusedNodesPass()(model)
        _rename(graph.inputs, renumbered(input_names, [v.name for v in graph.inputs]))
        _rename(graph.outputs, renumbered(output_names, [v.name for v in graph.outputs]))
        return ir.passes.PassResult(model, bool(self.blocks))

    def ensures(self, model: ir.Model) -> None:
        """The joining Add of every removed block is gone, and so is its cache."""
        left = {node.name for node in model.graph} & {block.name for block in self.blocks}
        if left:
            raise ir.passes.PostconditionError(f"blocks still joined after removal: {sorted(left)[:3]}")


def _drop_cache_inputs(graph: ir.Graph, names: set[str]) -> None:
    """Remove the past inputs ``names``; what still reads them (for their shape only: discovery checked that)
    reads a kept input of the same declared type and shape instead."""
    kept = [v for v in graph.inputs if v.name not in names]
    for value in [v for v in graph.inputs if v.name in names]:
        uses = list(value.uses())
        if uses:
            twin = next((k for k in kept if k.type == value.type and _dims(k) == _dims(value)), None)
            if twin is None:
                raise InputError(f"the past input {value.name!r} is also read for its shape, and no kept input "
                                 "has its shape; keep at least one layer of the same cache")
            for use in uses:
                use.node.replace_input_with(use.idx, twin)
        graph.inputs.remove(value)


def _dims(value: ir.Value) -> tuple | None:
    return None if value.shape is None else tuple(str(d) for d in value.shape)


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def renumbered(before: list[str], after: list[str]) -> dict[str, str]:
    """New names for ``after`` (a subset of ``before``, in order) where ``before`` numbers names of one
    template 0..n-1 (``present.%d.key``) and some are gone: the rest take 0..m-1 in their order."""
    templates: dict[tuple[str, str], list[int]] = {}
    for name in before:
        m = _NUMBERED.match(name)
        if m:
            templates.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
    contiguous = {key for key, numbers in templates.items()
                  if len(numbers) > 1 and sorted(numbers) == list(range(len(numbers)))}
    kept: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in after:
        m = _NUMBERED.match(name)
        if m and (m.group(1), m.group(3)) in contiguous:
            kept.setdefault((m.group(1), m.group(3)), []).append((int(m.group(2)), name))
    mapping = {}
    for (prefix, suffix), entries in kept.items():
        for new, (_, name) in enumerate(sorted(entries)):
            if f"{prefix}{new}{suffix}" != name:
                mapping[name] = f"{prefix}{new}{suffix}"
    return mapping


def _rename(values, mapping: dict[str, str]) -> None:
    """Rename graph inputs or outputs (a two-step rename: new names may be old names of others)."""
    targets = [v for v in values if v.name in mapping]
    for value in targets:
        value.name = f"{value.name}__onnxprune_renumber"
    for value in targets:
        value.name = mapping[value.name[: -len("__onnxprune_renumber")]]


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
