"""Store zero-heavy initializers as ONNX sparse initializers (SparseTensorProto), so the file shrinks, and
turn them back into dense ones on load (onnx-ir drops sparse initializers, which would leave weights dangling).

A sparse tensor stores its nonzero values and their int64 linear indices: for float32 it is smaller than
the dense tensor only above 2/3 sparsity, so only tensors where it saves bytes are converted. ONNX Runtime
densifies them when the session is created, so outputs are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["densify_sparse_initializers", "to_sparse_initializers"]


def to_sparse_initializers(proto: onnx.ModelProto, names: set[str]) -> list[str]:
    """Convert the named dense initializers in place where that makes them smaller; returns converted names."""
    keep, converted = [], []
    for init in proto.graph.initializer:
        if init.name not in names or init.data_location == onnx.TensorProto.EXTERNAL:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        flat = arr.reshape(-1)
        idx = np.flatnonzero(flat)
        sparse_bytes = idx.size * (arr.itemsize + 8)
        if sparse_bytes >= arr.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[idx], init.name)
        indices = numpy_helper.from_array(idx.astype(np.int64), "")
        proto.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
        converted.append(init.name)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    # a dense type declared for a now-sparse initializer (value_info, or a graph input in IR < 4 style)
    # contradicts its sparse type: drop those declarations
    done = set(converted)
    for field_name in ("value_info", "input"):
        entries = getattr(proto.graph, field_name)
        kept = [v for v in entries if v.name not in done]
        del entries[:]
        entries.extend(kept)
    return converted


def densify_sparse_initializers(proto: onnx.ModelProto) -> int:
    """Replace the sparse initializers of ``proto``'s main graph by dense ones in place; returns how many."""
    graph = proto.graph
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(dims, values.dtype)
        if indices.ndim == 2:  # one row of coordinates per value
            dense[tuple(indices.T)] = values
        else:  # linear indices
            dense.reshape(-1)[indices] = values
        graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
    count = len(graph.sparse_initializer)
    del graph.sparse_initializer[:]
    return count
