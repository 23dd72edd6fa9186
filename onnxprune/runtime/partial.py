"""Partial-graph evaluation: run the unmodified model once, keep the activations entering each unit, and
evaluate only the part of the graph from the unit to the outputs, with the unit's weights fed as inputs.

A *unit* is a set of nodes whose weights get replaced (one layer, or every layer of a residual block). For
a unit whose first node sits at position p of the topological order, the *cut* is every run-time value
produced before p and used at or after p (for a layer inside a residual block this includes the block's
skip value). The prefix session is the whole model with every cut value as an extra output; each unit's
suffix session holds nodes p.. of the graph, takes the cut values and the unit's weights as inputs, and is
built once: trying another weight is one ``run`` with other arrays, never a re-serialised model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxprune.analysis.graph import GraphInfo
from onnxprune.runtime.session import Session, create_session


@dataclass
class Unit:
    name: str
    nodes: list[str]  # node names belonging to the unit
    weights: list[str]  # value names of the weights that get replaced


@dataclass
class _Suffix:
    unit: Unit
    position: int
    cut: list[str]
    session: Session
    weight_inputs: list[str] = field(default_factory=list)


def _elem_type(info: GraphInfo, value: ir.Value) -> int:
    dtype = info.dtype(value)
    return int(dtype) if dtype is not None else onnx.TensorProto.FLOAT


class PartialEvaluator:
    def __init__(self, model: ir.Model, info: GraphInfo, units: list[Unit], provider: str = "cpu",
                 threads: int | None = None):
        self.info = info
        proto = ir.serde.serialize_model(model)
        graph = proto.graph
        nodes = list(graph.node)
        position = {n.name: i for i, n in enumerate(nodes)}
        const_nodes = {o: n for n in nodes if n.op_type == "Constant" for o in n.output}
        initializers = {t.name: t for t in graph.initializer}
        produced_at: dict[str, int] = {i.name: -1 for i in graph.input}
        for i, n in enumerate(nodes):
            for o in n.output:
                produced_at[o] = i
        values = {v.name: v for v in _all_values(model)}
        graph_outputs = [o.name for o in graph.output]
        self.output_names = graph_outputs
        self.suffixes: dict[str, _Suffix] = {}
        needed_cut: set[str] = set()
        for unit in units:
            p = min(position[n] for n in unit.nodes)
            weights = set(unit.weights)
            suffix_nodes = [n for n in nodes[p:] if not (n.op_type == "Constant" and set(n.output) & weights)]
            used = {i for n in suffix_nodes for i in n.input if i} | set(graph_outputs)
            cut = sorted(
                v for v in used
                if v in produced_at and produced_at[v] < p and v not in const_nodes and v not in weights
            )
            moved_consts = [const_nodes[v] for v in used if v in const_nodes and produced_at[v] < p and v not in weights]
            inputs = [helper.make_tensor_value_info(v, _elem_type(info, values[v]), None) for v in cut]
            w_inputs = []
            for w in unit.weights:
                arr_type, shape = _weight_type(initializers, const_nodes, w)
                w_inputs.append(helper.make_tensor_value_info(w, arr_type, shape))
            inits = [initializers[v] for v in used if v in initializers and v not in weights]
            sub = helper.make_model(
                helper.make_graph(moved_consts + suffix_nodes, f"suffix_{unit.name}", inputs + w_inputs,
                                  list(graph.output), initializer=inits),
                opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
            )
            for fn in proto.functions:
                sub.functions.append(fn)
            session = create_session(sub.SerializeToString(), provider, threads)
            self.suffixes[unit.name] = _Suffix(unit, p, cut, session, list(unit.weights))
            needed_cut.update(cut)
        extra = sorted(needed_cut - set(graph_outputs) - {i.name for i in graph.input})
        for v in extra:
            graph.output.append(helper.make_tensor_value_info(v, _elem_type(info, values[v]), None))
        self.prefix = create_session(proto.SerializeToString(), provider, threads)
        self.prefix_outputs = graph_outputs + extra

    def run_prefix(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unmodified model's outputs and every cut activation, for one batch."""
        arrays = self.prefix.run(feeds, self.prefix_outputs)
        acts = dict(zip(self.prefix_outputs, arrays, strict=True))
        acts.update(feeds)
        return acts

    def run_unit(self, unit: str, acts: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model outputs with ``unit``'s weights replaced, from the cached activations of one batch."""
        suffix = self.suffixes[unit]
        feeds = {v: acts[v] for v in suffix.cut}
        feeds.update(weights)
        return suffix.session.run(feeds, self.output_names)


def _weight_type(initializers: dict, const_nodes: dict, name: str) -> tuple[int, list[int]]:
    if name in initializers:
        t = initializers[name]
        return t.data_type, list(t.dims)
    node = const_nodes[name]
    t = next(a.t for a in node.attribute if a.name == "value")
    return t.data_type, list(t.dims)


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph:
        yield from node.outputs
