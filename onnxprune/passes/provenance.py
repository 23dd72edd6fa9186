"""Record what made a model in its metadata (no time stamps: the same inputs give the same bytes)."""

from __future__ import annotations

import json

import onnx_ir as ir

__all__ = ["ProvenancePass"]


class ProvenancePass(ir.passes.InPlacePass):
    """Write ``record`` as JSON under the metadata key ``key``; with ``keep_previous`` an earlier record under
    the same key (the model was pruned before) is kept inside the new one as ``previous``."""

    def __init__(self, key: str, record: dict, keep_previous: bool = True):
        super().__init__()
        self.key, self.record, self.keep_previous = key, record, keep_previous

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        record = dict(self.record)
        previous = model.metadata_props.get(self.key)
        if previous and self.keep_previous:
            try:
                record["previous"] = json.loads(previous)
            except json.JSONDecodeError:
                record["previous"] = previous
        model.metadata_props[self.key] = json.dumps(record, sort_keys=True)
        return ir.passes.PassResult(model, True)
