"""Block influence (ShortGPT, arXiv 2403.03853): how much a residual block changes the hidden state it is
given, 1 - cosine(the block's input, its output), averaged over samples and positions. One run of the model
on the data, however many blocks: the cheap data method for choosing blocks (decoder layers) to remove.
``allocate --method srinit`` takes these scores like SR-init's (each block's ``drop`` is its influence)."""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.blocks import FUSED_RESIDUAL_OPS, residual_inputs
from onnxprune.analysis.graph import constant_array
from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Scores
from onnxprune.errors import InputError
from onnxprune.runtime.feeding import calibration_batches
from onnxprune.runtime.graph_io import with_outputs
from onnxprune.runtime.session import model_session
from onnxprune.scoring.common import Progress, ScoreRequest, block_units, relative_to_max, sample_count, unit_entry

__all__ = ["check", "score_influence"]


def check(request: ScoreRequest) -> None:
    if request.units not in ("blocks", "transformer-layers"):
        raise InputError("--method influence scores residual blocks or transformer layers; drop --units layers")


def score_influence(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    groups = block_units(am, request.units)
    t0 = time.perf_counter()
    provider, batches = calibration_batches(am.model, request.data)
    nodes = {n.name: n for n in am.model.graph}
    # a unit's input: its first block's skip value; its output: the last block's residual sum (skip + branch,
    # added here: a fused Skip*Normalization's output 0 is normalised)
    ends = {name: (_skip(nodes, members[0]), _sum_terms(nodes[members[-1].name])) for name, members in groups}
    names = list(dict.fromkeys([x for x, _ in ends.values()] + [t for _, (terms, _) in ends.values() for t in terms]))
    session = model_session(am.model, provider, edit=lambda proto: with_outputs(proto, names, None))
    sums = dict.fromkeys(ends, 0.0)
    count = 0
    for k, (feeds, _) in enumerate(batches):
        values = dict(zip(names, session.run(feeds, names), strict=True))
        for name, (x, (terms, bias)) in ends.items():
            y = sum(np.asarray(values[t], np.float64) for t in terms) + bias
            sums[name] += float(_one_minus_cosine(values[x], y).sum())
        count += len(next(iter(feeds.values())))
        if progress:
            progress(k + 1, len(batches), {})
    units = []
    for name, members in groups:
        influence = sums[name] / max(count, 1)
        units.append({**unit_entry(name, members, request.units), "drop": influence, "drop_se": None,
                      "metrics": {"influence": influence}})
    for u, imp in zip(units, relative_to_max([u["drop"] for u in units]), strict=True):
        u["importance"] = imp
    return Scores(method="influence", fingerprint=am.fingerprint, input_shapes=am.shapes_record, units=units,
                  metric="influence", unit_kind=request.units,
                  options={"samples": sample_count(batches), "data": request.data.record(), "provider": provider,
                           "definition": "1 - cosine between a unit's input and output residual stream, per "
                                         "position (features: the last axis; channels of a feature map: axis 1)"},
                  timing={"seconds": round(time.perf_counter() - t0, 3)})


def _skip(nodes: dict, block) -> str:
    return nodes[block.name].inputs[1 - block.branch_input].name


def _sum_terms(join: ir.Node) -> tuple[list[str], np.ndarray | float]:
    """The values a residual join adds (its two inputs), and a fused join's constant bias (input 4)."""
    bias = join.inputs[4] if join.op_type in FUSED_RESIDUAL_OPS and len(join.inputs) > 4 else None
    return [v.name for v in residual_inputs(join)], 0.0 if bias is None else constant_array(bias)


def _one_minus_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample: 1 - cosine between x and y along the feature axis (axis 1 of a feature map (N, C, ...),
    else the last), averaged over the other positions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    axis = 1 if x.ndim >= 4 else -1
    dot = (x * y).sum(axis=axis)
    norm = np.sqrt((x * x).sum(axis=axis) * (y * y).sum(axis=axis))
    cos = dot / np.maximum(norm, 1e-12)
    return (1.0 - cos).reshape(len(x), -1).mean(axis=1)
