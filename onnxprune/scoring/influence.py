"""Block influence (ShortGPT, arXiv 2403.03853): how much a residual block changes the hidden state it is
given, 1 - cosine(the block's input, its output), averaged over samples and positions. One run of the model
on the data, however many blocks: the cheap data method for choosing blocks (decoder layers) to remove.
``allocate --method srinit`` takes these scores like SR-init's (each block's ``drop`` is its influence)."""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Scores
from onnxprune.errors import InputError
from onnxprune.runtime.feeding import calibration_batches
from onnxprune.runtime.graph_io import with_outputs
from onnxprune.runtime.session import create_session
from onnxprune.scoring.common import Progress, ScoreRequest, relative_to_max, sample_count

__all__ = ["check", "score_influence"]


def check(request: ScoreRequest) -> None:
    if request.units != "blocks":
        raise InputError("--method influence scores residual blocks; drop --units layers")


def score_influence(am: AnalysedModel, request: ScoreRequest, progress: Progress | None = None) -> Scores:
    blocks = am.blocks
    if not blocks:
        raise InputError("the model has no residual blocks; block influence needs some")
    t0 = time.perf_counter()
    provider, batches = calibration_batches(am.model, request.data)
    pairs = {}  # block -> (its input: the skip path's value, its output: the join's)
    nodes = {n.name: n for n in am.model.graph}
    for block in blocks:
        join = nodes[block.name]
        pairs[block.name] = (join.inputs[1 - block.branch_input].name, join.outputs[0].name)
    names = list(dict.fromkeys(n for pair in pairs.values() for n in pair))
    proto = with_outputs(ir.serde.serialize_model(am.model), names, None)
    session = create_session(proto.SerializeToString(), provider)
    sums = dict.fromkeys(pairs, 0.0)
    count = 0
    for k, (feeds, _) in enumerate(batches):
        values = dict(zip(names, session.run(feeds, names), strict=True))
        for name, (x, y) in pairs.items():
            sums[name] += float(_one_minus_cosine(values[x], values[y]).sum())
        count += len(next(iter(feeds.values())))
        if progress:
            progress(k + 1, len(batches), {})
    units = []
    for block in blocks:
        influence = sums[block.name] / max(count, 1)
        units.append({"name": block.name, "kind": "block", "params": block.params, "flops": block.flops,
                      "skip": block.skip, "removable": block.removable, "layers": block.layers,
                      "drop": influence, "drop_se": None, "metrics": {"influence": influence}})
    for u, imp in zip(units, relative_to_max([u["drop"] for u in units]), strict=True):
        u["importance"] = imp
    return Scores(method="influence", fingerprint=am.fingerprint, input_shapes=am.shapes_record, units=units,
                  metric="influence", unit_kind="blocks",
                  options={"samples": sample_count(batches), "data": request.data.record(), "provider": provider,
                           "definition": "1 - cosine between a block's input and output, per position "
                                         "(features: the last axis; channels of a feature map: axis 1)"},
                  timing={"seconds": round(time.perf_counter() - t0, 3)})


def _one_minus_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample: 1 - cosine between x and y along the feature axis (axis 1 of a feature map (N, C, ...),
    else the last), averaged over the other positions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    axis = 1 if x.ndim >= 4 else -1
    dot = (x * y).sum(axis=axis)
    norm = np.sqrt((x * x).sum(axis=axis) * (y * y).sum(axis=axis))
    cos = dot / np.maximum(norm, 1e-12)
    return (1.0 - cos).reshape(len(x), -1).mean(axis=1)
