"""Opening a model for a verb: load, name its nodes and hoist its bodies' weights (passes), wrap it as an
AnalysedModel."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxprune.analysis.input_shapes import merge_data_shapes, parse_input_shapes
from onnxprune.analysis.model import AnalysedModel
from onnxprune.io import load_model
from onnxprune.passes import HoistBodyWeightsPass, NameNodesPass
from onnxprune.runtime import data as rdata
from onnxprune.runtime.feeding import data_input_shapes

__all__ = ["InputShapesLike", "ModelLike", "data_path", "open_model"]

ModelLike = str | os.PathLike | ir.Model | AnalysedModel
# ``--input-shape`` settings ("NAME:D0,D1,..." or a bare "D0,D1,..." for a single input), or name -> sizes
InputShapesLike = Sequence[str] | Mapping[str, Sequence[int]] | None


def open_model(model: ModelLike, check: bool = True, input_shapes: InputShapesLike = None,
               data: rdata.DataSpec | None = None) -> AnalysedModel:
    """``model`` as an AnalysedModel: a path is loaded (``check``: onnx.checker), a bare ir.Model wrapped;
    either way its unnamed nodes get names. An AnalysedModel is used as it is.

    It is analysed at ``input_shapes`` (onnxprune.analysis.input_shapes) and, with ``data``, at the sizes
    the data fixes (a given shape that contradicts the data is an error naming both)."""
    if isinstance(model, AnalysedModel):
        am = model
    else:
        path = None
        if not isinstance(model, ir.Model):
            path = Path(model)
            model = load_model(path, check=check)
        NameNodesPass()(model)
        HoistBodyWeightsPass()(model)
        am = AnalysedModel(model, path)
    shapes = parse_input_shapes(input_shapes, am.model) if input_shapes else dict(am.input_shapes)
    if data is not None and data.given and (shapes or am.unknown_dims):
        shapes = merge_data_shapes(shapes, data_input_shapes(am.model, data), am.model)
    return am.at_shapes(shapes)


def data_path(data) -> str | os.PathLike | None:
    """The .npz path of a data argument (a path or a DataSpec), for the never-overwrite-an-input check."""
    if isinstance(data, rdata.DataSpec):
        return data.data
    return data
