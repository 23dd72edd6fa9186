"""A model run piece by piece: its top-level nodes cut into consecutive segments, each its own session.

Sequential layer-by-layer methods (OBS / Wanda in onnxprune.passes.data_aware) need each layer's inputs in
the model as already pruned up to that layer. Running the whole model once per layer costs one pass over
the data per layer; cutting it at the layers and carrying the values that cross each cut (the *state*:
a residual stream, a KV cache input, the graph inputs still to be read) from one segment to the next costs
about one pass in all. The state holds only what is still to be read, so its size is that of the widest
cut, per calibration batch.

Segments are cut in the graph's order (ONNX graphs are topologically sorted). A node with subgraphs (If,
Loop, Scan) reads the outer values its bodies name, and a cut never falls inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime.graph_io import value_types
from onnxprune.runtime.session import create_session

__all__ = ["Segments"]


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        for body in _bodies(node):
            read |= _outer_names(body)
        defined.update(node.output)
    read.update(o.name for o in graph.output)
    return read - defined


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + \
        [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for body in _bodies(node):
        names |= _outer_names(body)
    return names


class Segments:
    """``proto`` cut before each node index in ``cuts`` (top-level nodes; ``starts``: where each segment
    begins). ``run(i, state, feeds)`` runs segment i on a state (the values crossing the cut before it) and
    returns the state after it; ``keep`` names values to carry although nothing later reads them (a layer's
    output to measure). Weights fed at run time (graph inputs made by weights_as_inputs) come in ``feeds``,
    not in the state."""

    def __init__(self, proto: onnx.ModelProto, cuts: Iterable[int], provider: str = "cpu",
                 fed: Iterable[str] = (), keep: Iterable[str] = ()):
        graph = proto.graph
        nodes = list(graph.node)
        self.starts = sorted({0, *(i for i in cuts if 0 < i < len(nodes))})
        bounds = list(zip(self.starts, self.starts[1:] + [len(nodes)]))
        self.fed = set(fed)
        initializers = {t.name: t for t in graph.initializer}
        last_read: dict[str, int] = {}
        for s, (a, b) in enumerate(bounds):
            for node in nodes[a:b]:
                for name in _reads(node):
                    last_read[name] = s
        self._last_read = last_read
        keep = set(keep)
        types = value_types(proto)
        self._sessions: list = []
        self._inputs: list[list[str]] = []
        self._outputs: list[list[str]] = []
        for s, (a, b) in enumerate(bounds):
            seg = nodes[a:b]
            made = {o for n in seg for o in n.output if o}
            reads = set().union(*(_reads(n) for n in seg))
            inputs = sorted(reads - made - set(initializers))
            outputs = sorted(n for n in made if last_read.get(n, -1) > s or n in keep)
            self._inputs.append(inputs)
            self._outputs.append(outputs)
            if not outputs:
                self._sessions.append(None)
                continue
            used = reads & set(initializers)
            sub = helper.make_graph(seg, f"segment{s}", [_info(n, types) for n in inputs],
                                    [_info(n, types) for n in outputs], [initializers[n] for n in sorted(used)])
            model = helper.make_model(sub, ir_version=proto.ir_version, opset_imports=proto.opset_import,
                                      functions=proto.functions)
            self._sessions.append(create_session(model.SerializeToString(), provider, spin=False).session)
        self.count = len(bounds)

    def run(self, i: int, state: dict[str, np.ndarray], feeds: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        """The state after segment ``i``: what ``state`` holds that later segments read, and what segment i
        makes that they read (or that ``keep`` names). ``feeds`` is read only for the fed values segment i
        reads (a lazy mapping: one layer's weight in memory at a time)."""
        feeds = feeds or {}
        out = {n: v for n, v in state.items() if self._last_read.get(n, -1) > i}
        if self._sessions[i] is not None:
            names = self._outputs[i]
            values = self._sessions[i].run(names, {n: feeds[n] if n in self.fed else state[n]
                                                   for n in self._inputs[i]})
            out.update(zip(names, values))
        return out


def _info(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A segment's input or output: its element type, no shape (the data may be of other sizes than the
    ones the model was analysed at)."""
    info = onnx.ValueInfoProto(name=name)
    found = types.get(name)
    if found is not None and not found.HasField("tensor_type"):
        info.type.CopyFrom(found)  # a sequence or optional value: as it is
    else:  # a tensor: its element type, float where shape inference found none
        elem = found.tensor_type.elem_type if found is not None else onnx.TensorProto.FLOAT
        info.type.CopyFrom(helper.make_tensor_type_proto(elem or onnx.TensorProto.FLOAT, None))
    return info
