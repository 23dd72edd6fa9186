"""sweep.json: accuracy against sparsity for several allocation methods, as ``onnxprune sweep`` writes it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from onnxprune._version import __version__
from onnxprune.artefacts.files import read_json
from onnxprune.errors import InputError

__all__ = ["SWEEP_SCHEMA", "Sweep", "load_sweep"]

SWEEP_SCHEMA = "onnxprune.sweep/1"


@dataclass
class Sweep:
    """Accuracy (or, without labels, output error) against sparsity for several allocation methods (one row per
    method and sparsity)."""

    fingerprint: str
    granularity: str
    budget: str
    dense: dict
    rows: list[dict]
    data: dict
    options: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The row value measured: ``top1`` (labelled data) or ``output_error`` (against the dense model)."""
        return self.options.get("metric") or ("top1" if self.dense.get("top1") is not None else "output_error")

    @property
    def metric_label(self) -> str:
        return "top-1 %" if self.metric == "top1" else "output error % against the dense model"

    def to_dict(self) -> dict:
        return {"schema": SWEEP_SCHEMA, "onnxprune_version": __version__, "model_fingerprint": self.fingerprint,
                "granularity": self.granularity, "budget": self.budget, "data": self.data, "options": self.options,
                "dense": self.dense, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict, source: str = "sweep") -> Sweep:
        if not isinstance(d, dict) or d.get("schema") != SWEEP_SCHEMA:
            raise InputError(f"{source} is not a sweep file (schema {SWEEP_SCHEMA!r}); make one with onnxprune sweep")
        rows = d.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "sparsity"} <= set(r)
                                                 for r in rows):
            raise InputError(f"{source}: 'rows' must be a list of objects with method and sparsity")
        return cls(fingerprint=str(d.get("model_fingerprint")), granularity=d.get("granularity", "unstructured"),
                   budget=d.get("budget", "params"), dense=d.get("dense") or {}, rows=rows, data=d.get("data") or {},
                   options=d.get("options") or {})


def load_sweep(path: str | os.PathLike) -> Sweep:
    return Sweep.from_dict(read_json(path, "sweep"), str(path))
