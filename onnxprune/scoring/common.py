"""What every scorer shares: the request, a layer's entry in scores.json, calibration data, normalisation."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.analysis.blocks import Block, transformer_layers
from onnxprune.analysis.layers import Layer
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan
from onnxprune.errors import InputError
from onnxprune.io import referencing_bytes, resolved_model
from onnxprune.runtime import data as rdata
from onnxprune.runtime.backend import Backend
from onnxprune.runtime.feeding import calibration_batches
from onnxprune.runtime.language_model import decoder_of
from onnxprune.runtime.metrics import class_scores
from onnxprune.runtime.session import model_session

__all__ = ["DEFAULT_MAX_MEMORY", "Progress", "ScoreRequest", "batch_slices", "block_units", "calibration", "choose_metric", "chunks", "layer_entry",
           "memory_groups", "owned_layers", "received", "relative_to_max", "sample_count", "shipped", "suffix_weight_bytes", "unit_entry"]

Progress = Callable[[int, int | None], None]
NO_LAYERS = "the model has no prunable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight)"


@dataclass
class ScoreRequest:
    """Every scorer's options; each method reads its own (see ``onnxprune.api.score``)."""

    metric: str | None = None
    data: rdata.DataSpec | None = None
    grid: tuple[float, ...] | None = None
    at: Plan | str | os.PathLike | None = None  # sensitivity: measure around this plan (or its file)
    tolerance: float = 1.0
    units: str = "blocks"  # srinit: blocks | transformer-layers | layers; influence: blocks | transformer-layers
    seed: int = 1
    seeds: int = 1
    max_memory: int | None = None
    backend: Backend = field(default_factory=Backend)  # srinit: where the (unit, seed) runs go


def owned_layers(am: AnalysedModel) -> list[Layer]:
    """The layers that own their weight, refusing a model without any."""
    layers = am.owned_layers
    if not layers:
        raise InputError(NO_LAYERS)
    return layers


def layer_entry(am: AnalysedModel, layer: Layer) -> dict:
    """A layer's fields in scores.json (FLOPs of every layer sharing its weight)."""
    return {"name": layer.name, "op_type": layer.op_type, "weight": layer.weight,
            "weight_shape": list(layer.weight_shape), "params": int(np.prod(layer.weight_shape)),
            "flops": am.weight_flops(layer)}


def calibration(am: AnalysedModel, spec: rdata.DataSpec, backend: Backend = Backend()
                ) -> tuple[list[Layer], str, list]:
    """The layers to score, the provider to measure on, and every calibration batch. Here the provider is the
    one ONNX Runtime really gave; on a cluster it is the one asked for (``--provider``, default auto), as
    each worker gets its own: a driver without a GPU must not send GPU workers to the CPU."""
    layers = owned_layers(am)
    provider, batches = calibration_batches(am.model, spec)
    return layers, provider if backend.kind == "local" else spec.provider, batches


def untaken_branches(am: AnalysedModel, layers: list[Layer], batches: list, provider: str) -> dict[str, str]:
    """Layer name -> why it is not scored, for the layers in an If branch the data never takes: measuring
    them on this data would call them unimportant when the data just does not reach them."""
    ifs = {layer.scope for layer in layers if layer.branch in ("then_branch", "else_branch")}
    conditions = {node.name: node.inputs[0].name for node in am.model.graph if node.name in ifs}
    if not conditions or not batches:
        return {}
    names = list(dict.fromkeys(conditions.values()))

    def with_conditions(proto):
        for name in names:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
        return proto

    session = model_session(am.model, provider, edit=with_conditions)
    seen: dict[str, set[bool]] = {name: set() for name in names}
    for feeds, _ in batches:
        for name, value in zip(names, session.run(feeds, names), strict=True):
            seen[name].update(bool(v) for v in np.asarray(value).reshape(-1))
    taken = {node: {branch for branch, value in (("then_branch", True), ("else_branch", False))
                    if value in seen[cond]} for node, cond in conditions.items()}
    return {layer.name: f"the data never takes {layer.scope}'s {layer.branch}" for layer in layers
            if layer.scope in taken and layer.branch not in taken[layer.scope]}


def shipped(am: AnalysedModel) -> dict:
    """What a remote task needs to rebuild ``am``: the analysed model's bytes (nodes named, body weights
    hoisted; external weights as references to their files, which every worker must see) and the input
    sizes it was analysed at (see received)."""
    model, folder = referencing_bytes(am.model)
    return {"model": model, "data_folder": folder, "input_shapes": dict(am.input_shapes)}


def received(shared: dict) -> AnalysedModel:
    """The AnalysedModel a task rebuilds from ``shipped``'s fields: the same layers, the same names."""
    model = resolved_model(shared["model"], shared["data_folder"])
    return AnalysedModel(model, None).at_shapes(shared["input_shapes"] or {})


def chunks(items: list, backend: Backend) -> list[list]:
    """``items`` cut into consecutive tasks, about twice as many as ``backend`` runs at once."""
    size = -(-len(items) // max(min(len(items), 2 * backend.parallelism()), 1))
    return [items[i:i + size] for i in range(0, len(items), size)]


DEFAULT_MAX_MEMORY = 2 << 30  # bytes: suffix sessions alive at once plus one batch of cached activations


def suffix_weight_bytes(model: ir.Model, units: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Unit name -> bytes of the weights a suffix session of the unit (its node names) holds: every
    initializer still read at or after the unit's first node, in graph order. Found without a session."""
    nodes = list(model.graph)
    position = {node.name: i for i, node in enumerate(nodes)}
    last_read: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                last_read[value.name] = (i, value.const_value.nbytes)
    held_from = np.zeros(len(nodes) + 1, dtype=np.int64)
    for i, nbytes in last_read.values():
        held_from[i] += nbytes
    held_from = np.cumsum(held_from[::-1])[::-1]  # held_from[p]: bytes read at or after node p
    return {name: int(held_from[min(position[n] for n in node_names if n in position)])
            for name, node_names in units}


def memory_groups(items: list, weight_bytes: Callable[[Any], int], budget: int) -> list[list]:
    """``items`` (each a suffix session to hold) in consecutive groups whose sessions fit in ``budget`` bytes
    together (at least one each). A session holds its suffix's weights and about as much again for ONNX
    Runtime's pre-packed copies. Each group costs a pass over the data."""
    groups, current, used = [], [], 0
    for item in items:
        need = 2 * weight_bytes(item)
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(item)
        used += need
    return groups + [current] if current else groups


def batch_slices(batches: int, tasks: int, backend: Backend) -> list[tuple[int, int]]:
    """[start, stop) slices of ``batches`` batches: one, or as many as it takes for ``tasks`` tasks per slice
    to make about twice as many tasks as ``backend`` runs at once."""
    wanted = min(batches, -(-2 * backend.parallelism() // max(tasks, 1)))
    size = -(-batches // max(wanted, 1))
    return [(i, min(i + size, batches)) for i in range(0, batches, size)] or [(0, 0)]


def sample_count(batches: list) -> int:
    return sum(len(next(iter(f.values()))) for f, _ in batches)


def relative_to_max(values: list[float], absolute: bool = False) -> list[float]:
    """Importance: each value over the largest (of the absolute values with ``absolute``); all 1 if that is 0."""
    top = max((abs(v) if absolute else v for v in values), default=0.0)
    return [v / top if top > 0 else 1.0 for v in values]


CLASS_METRICS = ("top1", "agreement", "kl")


def block_units(am: AnalysedModel, units: str) -> list[tuple[str, list[Block]]]:
    """(unit name, its blocks) for ``--units blocks`` (each residual block) or ``transformer-layers`` (an
    attention block with the blocks after it: a decoder layer, named by its attention block)."""
    blocks = am.blocks
    if not blocks:
        raise InputError("the model has no residual blocks; use --units layers")
    if units == "blocks":
        return [(b.name, [b]) for b in blocks]
    layers = transformer_layers(blocks)
    if not layers:
        raise InputError("no residual block of the model attends (no attention op, Softmax or KV cache): it has "
                         "no transformer layers; use --units blocks")
    return [(members[0].name, members) for members in layers]


def unit_entry(name: str, members: list[Block], units: str) -> dict:
    """A scores-file unit for a block or a transformer layer (its blocks listed)."""
    flops = [b.flops for b in members]
    entry = {"name": name, "kind": "block" if units == "blocks" else "transformer-layer",
             "params": sum(b.params for b in members), "flops": None if None in flops else sum(flops),
             "skip": members[0].skip, "removable": all(b.removable for b in members),
             "layers": [n for b in members for n in b.layers]}
    if units != "blocks":
        entry["blocks"] = [b.name for b in members]
    return entry


def choose_metric(am: AnalysedModel, requested: str | None, batches: list,
                  classifier_default: str | None) -> tuple[str, str | None]:
    """(the metric to measure by, a notice when it was chosen for the user). Class scores (one output of
    shape (batch, classes)) default to ``classifier_default``, or top-1 with labels and agreement without;
    any other outputs to ``error`` (onnxprune.runtime.metrics.output_error over every output)."""
    labelled = all(labels is not None for _, labels in batches)
    classes = class_scores([am.info.shape(v) for v in am.model.graph.outputs])
    if decoder_of(am.model) is not None:  # next-token distributions at every position
        if requested == "top1":
            raise InputError("--metric top1 needs class labels; a language model is measured by kl (next-token "
                             "distributions against the unmodified model), agreement or error")
        return requested or "kl", None
    if requested is not None:
        if requested == "top1" and not labelled:
            raise InputError("--metric top1 needs labels in the data; use agreement, kl or error without labels")
        if requested in CLASS_METRICS and not classes:
            raise InputError(f"--metric {requested} compares class scores, and the model's outputs are not one "
                             f"(batch, classes) tensor; use --metric error (output fidelity)")
        return requested, None
    if not classes:
        return "error", ("the model's outputs are not class scores: measuring the relative squared error of "
                         "every output against the unmodified model (metric error, percent)")
    if classifier_default is not None:
        return classifier_default, None
    if labelled:
        return "top1", None
    return "agreement", "the data has no labels: measuring top-1 agreement with the unmodified model"
