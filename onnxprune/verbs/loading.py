"""Opening a model for a verb: load, name its nodes (a pass), wrap it as an AnalysedModel."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from onnxprune.analysis.model import AnalysedModel
from onnxprune.io import load_model
from onnxprune.passes import NameNodesPass
from onnxprune.runtime import data as rdata

__all__ = ["ModelLike", "data_path", "open_model"]

ModelLike = str | os.PathLike | ir.Model | AnalysedModel


def open_model(model: ModelLike, check: bool = True) -> AnalysedModel:
    """``model`` as an AnalysedModel: a path is loaded (``check``: onnx.checker), a bare ir.Model wrapped;
    either way its unnamed nodes get names. An AnalysedModel is returned as it is."""
    if isinstance(model, AnalysedModel):
        return model
    path = None
    if not isinstance(model, ir.Model):
        path = Path(model)
        model = load_model(path, check=check)
    NameNodesPass()(model)
    return AnalysedModel(model, path)


def data_path(data) -> str | os.PathLike | None:
    """The .npz path of a data argument (a path or a DataSpec), for the never-overwrite-an-input check."""
    if isinstance(data, rdata.DataSpec):
        return data.data
    return data
