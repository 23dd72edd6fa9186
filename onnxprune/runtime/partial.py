"""Partial-graph evaluation: run the unmodified model once, keep the activations entering each part, and
evaluate only the graph from the part to the outputs with other weights for the part.

A *part* is a set of nodes whose weights get replaced (one layer, or every layer of a residual block). For
a part whose first node sits at position p of the topological order, the *cut* is every run-time value
produced before p and used at or after p (for a layer inside a residual block this includes the block's
skip value). The prefix session is the whole model with every cut value as an extra output; each part's
suffix graph holds nodes p.. of the graph and takes the cut values as inputs. It is serialised once; other
weights for the part never re-serialise it. Two ways to inject them:

- ``inject="inputs"``: the part's weights are inputs of one suffix session per part, so trying another
  weight is one ``run`` with other arrays. Right for many weight variants on little data (sensitivity
  curves, search), but ONNX Runtime cannot pre-pack weights that are inputs (on x86 its blocked NCHWc
  convolutions need constant weights), so each run is slower: about 1.8x on ResNet-56.
- ``inject="initializers"``: the part's weights are initializers whose bytes are supplied when a session is
  made (``SessionOptions.add_external_initializers``: no copy of the model, no serialisation), one session
  per weight set (:meth:`PartialEvaluator.bind`). Each run is as fast as the unmodified model's. Right for
  a few weight sets on much data (SR-init: one per seed).

A model with external data (over 2 GB, a 7B decoder) is never inlined: its external initializers stay
references in every serialised slice, and each session gets them as ``OrtValue``s over the memory map
(``add_external_initializers`` again), so no slice nears protobuf's 2 GB limit and no session copies the
file's bytes into a model of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxprune.analysis.graph import GraphInfo
from onnxprune.analysis.shape_inference import outer_reads, proto_bodies
from onnxprune.io import external_tensors, session_proto
from onnxprune.runtime.graph_io import weight_tensor_type
from onnxprune.runtime.session import Session, create_session, likely_provider, mapped_value, ort_value

__all__ = ["INJECTED", "Bound", "Part", "PartialEvaluator"]

INJECTED = "onnxprune-injected-weights"  # external-data location of weights supplied at session creation


@dataclass
class Part:
    name: str
    nodes: list[str]  # node names belonging to the part
    weights: list[str]  # value names of the weights that get replaced


@dataclass
class _Suffix:
    part: Part
    position: int
    cut: list[str]
    model: bytes  # the serialised suffix graph
    stored: list[str]  # the model's external initializers it reads (supplied at session creation)
    session: Session | None = None  # inject="inputs": the one session of this part


class Bound:
    """A suffix session with one set of the part's weights built in (or fed on each run)."""

    def __init__(self, suffix: _Suffix, session: Session, outputs: list[str], feeds: dict | None = None,
                 keep: list | None = None):
        self.suffix, self.session, self.outputs = suffix, session, outputs
        self._feeds = feeds or {}
        self._keep = keep  # OrtValues whose memory the session uses

    @property
    def cut(self) -> list[str]:
        return self.suffix.cut

    def run(self, acts: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {v: acts[v] for v in self.suffix.cut}
        feeds.update(self._feeds)
        return self.session.run(feeds, self.outputs)


def _elem_type(info: GraphInfo, value: ir.Value) -> int:
    dtype = info.dtype(value)
    return int(dtype) if dtype is not None else onnx.TensorProto.FLOAT


class PartialEvaluator:
    def __init__(self, model: ir.Model, info: GraphInfo, parts: list[Part], provider: str = "cpu",
                 threads: int | None = None, inject: str = "inputs"):
        if inject not in ("inputs", "initializers"):
            raise ValueError(f"inject must be inputs or initializers, got {inject!r}")
        self.info, self.provider, self.threads, self.inject = info, provider, threads, inject
        self._outside = external_tensors(model.graph)
        self._outside_values: dict[str, object] = {}  # name -> OrtValue over the memory map, made once
        proto = session_proto(model, leave_out=self._outside)
        self._proto = proto
        graph = proto.graph
        self._nodes = nodes = list(graph.node)
        position = {n.name: i for i, n in enumerate(nodes)}
        self._const_nodes = {o: n for n in nodes if n.op_type == "Constant" for o in n.output}
        self._initializers = {t.name: t for t in graph.initializer}
        self._produced_at: dict[str, int] = {i.name: -1 for i in graph.input}
        for i, n in enumerate(nodes):
            for o in n.output:
                self._produced_at[o] = i
        self._values = {v.name: v for v in _all_values(model)}
        self.output_names = [o.name for o in graph.output]
        self.suffixes: dict[str, _Suffix] = {}
        needed_cut: set[str] = set()
        for part in parts:
            p = min(position[n] for n in part.nodes)
            model_bytes, cut, stored = self._slice(p, len(nodes), self.output_names, part.weights)
            suffix = _Suffix(part, p, cut, model_bytes, stored)
            if inject == "inputs":
                suffix.session = create_session(suffix.model, provider, threads, spin=False,
                                                external=self._stored_values(stored))
            self.suffixes[part.name] = suffix
            needed_cut.update(cut)
        self._prefix_extra = sorted(needed_cut - set(self.output_names) - {i.name for i in graph.input})
        self._prefix: Session | None = None

    def _slice(self, start: int, end: int, outputs: list[str], weights: list[str] = (),
               taps: list[str] = ()) -> tuple[bytes, list[str], list[str]]:
        """Nodes [start, end) as a model: inputs are the run-time values made before ``start`` that they use,
        ``weights`` (if any) become inputs or injected initializers; each of ``taps`` is copied by an Identity
        to the output ``<name>__cut``. Returns (model bytes, input names, the external initializers it reads)."""
        weight_set = set(weights)
        const_nodes, produced_at, info = self._const_nodes, self._produced_at, self.info
        body = [n for n in self._nodes[start:end] if not (n.op_type == "Constant" and set(n.output) & weight_set)]
        body += [helper.make_node("Identity", [v], [f"{v}__cut"], name=f"{v}__tap") for v in taps]
        used = {i for n in body for i in _reads(n)} | set(outputs)
        cut = sorted(v for v in used if v in produced_at and produced_at[v] < start and v not in const_nodes
                     and v not in weight_set)
        moved = [const_nodes[v] for v in used if v in const_nodes and produced_at[v] < start and v not in weight_set]
        inputs = [helper.make_tensor_value_info(v, _elem_type(info, self._values[v]), self._dims(v)) for v in cut]
        inits = [self._initializers[v] for v in used if v in self._initializers and v not in weight_set]
        if likely_provider(self.provider) == "cpu":  # a worker asked for auto, with no GPU: the CPU's layout
            body, eyes = self._layout_bridges(cut if start > 0 else [], body, outputs)
            inits += eyes
        for w in weights:
            data_type, shape = weight_tensor_type(self._initializers, const_nodes, w)
            if self.inject == "inputs":
                inputs.append(helper.make_tensor_value_info(w, data_type, shape))
            else:
                inits.append(_placeholder(w, data_type, shape))
        tapped = {f"{v}__cut": v for v in taps}
        outs = [helper.make_tensor_value_info(v, _elem_type(info, self._values[tapped.get(v, v)]), None)
                for v in outputs]
        proto = self._proto
        sub = helper.make_model(
            helper.make_graph(moved + body, f"slice_{start}_{end}", inputs, outs, initializer=inits),
            opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
        )
        for fn in proto.functions:
            sub.functions.append(fn)
        stored = sorted(v for v in used if v in self._outside and v not in weight_set)
        return sub.SerializeToString(), cut, stored

    def _stored_values(self, names: list[str]) -> dict[str, object]:
        """OrtValues of external initializers, viewing the memory map (one per initializer, kept alive here)."""
        for name in names:
            if name not in self._outside_values:
                self._outside_values[name] = mapped_value(self._outside[name])
        return {name: self._outside_values[name] for name in names}

    def _dims(self, v: str) -> list | None:
        """The inferred shape of value v for a graph input (unknown dimensions symbolic), or None."""
        shape = self.info.shape(self._values[v])
        if shape is None:
            return None
        return [d if isinstance(d, int) else f"{v}_d{i}" for i, d in enumerate(shape)]

    def _layout_bridges(self, values: list[str], body: list, outputs: list[str]) -> tuple[list, list]:
        """(body with the bridges, their weights):
        an exact identity 1x1 Conv on each of ``values`` that is 4-D float (weights 1 on the diagonal, 0
        elsewhere: every value passes unchanged, bit for bit). On x86 ONNX Runtime keeps convolution chains in
        its blocked NCHWc layout and fuses a residual Add into the convolution before it only when the Add's
        other input is in that layout too. A graph input is not, so without the bridge every Add after the cut
        runs unfused with layout reorders around it (a suffix of ResNet-56 from block 0: 27 unfused Adds where
        the whole model has 18, 5-7 % slower); with it the suffix fuses exactly as the whole model does and
        its outputs are bit-identical to the whole model's. (Bridging the option-A shortcut's Pad output too
        fuses every Add and runs faster than the exported model, but a fused Add rounds differently: the
        outputs then differ by ~1e-5, so that is not done.)"""
        bridges, eyes, renamed = {}, [], {}
        if not any(n.op_type == "Conv" for n in self._nodes):
            return body, []  # no convolution chain to keep in its layout (a transformer's 4-D values are heads)
        for v in values:
            shape = self.info.shape(self._values[v])
            if (v in outputs or self._produced_at[v] < 0 or shape is None or len(shape) != 4
                    or not isinstance(shape[1], int)
                    or _elem_type(self.info, self._values[v]) != onnx.TensorProto.FLOAT):
                continue
            c = shape[1]
            eyes.append(onnx.numpy_helper.from_array(np.eye(c, dtype=np.float32).reshape(c, c, 1, 1), f"{v}__eye"))
            renamed[v] = f"{v}__nchwc"
            bridges[v] = helper.make_node("Conv", [v, eyes[-1].name], [renamed[v]], name=f"{v}__bridge")
        if not renamed:
            return body, []
        made_here = {o for n in body for o in n.output}
        out = [bridge for v, bridge in bridges.items() if v not in made_here]
        for n in body:
            if any(i in renamed for i in n.input):
                n2 = onnx.NodeProto()
                n2.CopyFrom(n)
                for k, i in enumerate(n2.input):
                    n2.input[k] = renamed.get(i, i)
                n = n2
            out.append(n)
            out += [bridges[o] for o in n.output if o in bridges]
        return out, eyes

    @property
    def prefix(self) -> Session:
        """The whole model with every cut value as an extra output (built on first use).

        Each cut value leaves through an Identity of its own (``<name>__cut``): ONNX Runtime 1.31 fuses a
        Conv into the Add after it even when the Conv's output is a graph output, and then fails to load
        ("Failed to find node output ... producing output"); a projection shortcut whose skip Conv comes after
        the branch in the node order triggers it."""
        if self._prefix is None:
            model_bytes, _, stored = self._slice(0, len(self._nodes),
                                                 self.output_names + [f"{v}__cut" for v in self._prefix_extra],
                                                 taps=self._prefix_extra)
            self._prefix = create_session(model_bytes, self.provider, self.threads, spin=False,
                                          external=self._stored_values(stored))
        return self._prefix

    @property
    def ran_on(self) -> str | None:
        """The provider the whole-model session really got (cuda, or cpu after a fallback); None before it
        is made."""
        return None if self._prefix is None else self._prefix.provider

    @property
    def prefix_outputs(self) -> list[str]:
        return self.output_names + self._prefix_extra

    def run_prefix(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unmodified model's outputs and every cut activation, for one batch."""
        arrays = self.prefix.run(feeds, self.output_names + [f"{v}__cut" for v in self._prefix_extra])
        acts = dict(zip(self.prefix_outputs, arrays, strict=True))
        acts.update(feeds)
        return acts

    def weight_bytes(self, part: str) -> int:
        """About the bytes of weights a session of ``part``'s suffix holds."""
        suffix = self.suffixes[part]
        own = sum(int(np.prod(weight_tensor_type(self._initializers, self._const_nodes, w)[1], dtype=np.int64))
                  * _itemsize(weight_tensor_type(self._initializers, self._const_nodes, w)[0]) for w in suffix.part.weights)
        stored = sum(self._outside[name].nbytes for name in suffix.stored)
        return len(suffix.model) + stored + (own if self.inject == "initializers" else 0)

    def bind(self, part: str, weights: dict[str, np.ndarray]) -> Bound:
        """A runnable suffix of ``part`` with these weights (every weight of the part, by value name)."""
        suffix = self.suffixes[part]
        missing = set(suffix.part.weights) - set(weights)
        if missing:
            raise ValueError(f"weights for part {part!r} miss {sorted(missing)}")
        if self.inject == "inputs":
            return Bound(suffix, suffix.session, self.output_names, feeds=dict(weights))
        names = list(suffix.part.weights)
        arrays = [np.require(weights[n], requirements="C") for n in names]
        values = [ort_value(a) for a in arrays]
        session = create_session(suffix.model, self.provider, self.threads, spin=False,
                                 external={**self._stored_values(suffix.stored), **dict(zip(names, values, strict=True))})
        return Bound(suffix, session, self.output_names, keep=arrays + values)

    def run_part(self, part: str, acts: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model outputs with ``part``'s weights replaced, from the cached activations of one batch."""
        return self.bind(part, weights).run(acts)


def _placeholder(name: str, data_type: int, shape: list[int]) -> onnx.TensorProto:
    """An initializer whose bytes come at session creation (external data that is never read from disk)."""
    t = onnx.TensorProto(name=name, data_type=data_type, dims=shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", INJECTED), ("offset", "0"),
                       ("length", str(int(np.prod(shape, dtype=np.int64)) * _itemsize(data_type)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph:
        yield from node.outputs



def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs and what its bodies (If / Loop / Scan) read from around them."""
    names = {i for i in node.input if i}
    for body in proto_bodies(node):
        names |= outer_reads(body)
    return names
