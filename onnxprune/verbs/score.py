"""``score``: per-layer (or per-block) importance by a method of onnxprune.scoring.registry."""

from __future__ import annotations

import os
from collections.abc import Callable

from onnxprune.artefacts import Plan, Scores
from onnxprune.errors import InputError
from onnxprune.runtime import data as rdata
from onnxprune.runtime.backend import Backend
from onnxprune.scoring.common import ScoreRequest
from onnxprune.scoring.registry import SCORERS
from onnxprune.verbs.loading import InputShapesLike, ModelLike, open_model

__all__ = ["score"]


def score(
    model: ModelLike,
    method: str = "capacity",
    *,
    metric: str | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    grid: tuple[float, ...] | None = None,
    at: Plan | str | os.PathLike | None = None,
    tolerance: float = 1.0,
    units: str = "blocks",
    seed: int = 1,
    seeds: int = 1,
    max_memory: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    input_shapes: InputShapesLike = None,
    backend: Backend | None = None,
    **data_options,
) -> Scores:
    """Per-layer importance.

    - ``capacity`` (data-free): a capacity metric of each weight tensor (onnxprune.scoring.capacity).
    Data-driven methods read ``data`` (an .npz path or a DataSpec) and the DataSpec options as keywords.

    - ``sensitivity`` (data): for each layer alone, the output drop (``metric`` kl | agreement | top1) at each
      sparsity of ``grid`` under magnitude pruning, measured with partial-graph evaluation. With ``at`` (a
      plan), each layer varies while the others stay at the plan's sparsities: curves around that operating
      point, which correct the additivity assumption at high sparsity (score, allocate, score --at, allocate).
    - ``srinit`` (data): for each residual block (``units="blocks"``) or layer (``"layers"``), the drop
      (``metric`` top1 | agreement | kl) when its weights are re-initialised (Kaiming normal, zero bias,
      fresh BatchNorm), over ``seeds`` seeds from ``seed``; activations cached up to ``max_memory`` bytes
      (default 2 GiB); see onnxprune.scoring.srinit.
    - ``compactness`` (data): for each layer alone, the highest sparsity whose top-1 drop (agreement drop
      without labels) stays within ``tolerance`` points, by bisection; importance = 1 - compactness, usable
      by ``allocate --method capacity``.

    ``input_shapes`` (see onnxprune.api.inspect) size the dynamic input dimensions the data does not fix;
    the scores record the sizes they were made at.

    ``backend`` (srinit, sensitivity, compactness): ``Backend("ray", address)`` runs tasks of consecutive
    units or layers on a Ray cluster (see onnxprune.runtime.backend); the scores equal the local path's.
    """
    scorer = SCORERS.get(method)
    if scorer is None:
        raise InputError(f"unknown scoring method {method!r}; available: {', '.join(SCORERS)}")
    spec = rdata.DataSpec.of(data, **data_options) if scorer.needs_data else None
    backend = backend or Backend()
    if backend.kind != "local" and method not in ("srinit", "sensitivity", "compactness"):
        raise InputError(f"--backend {backend.kind} runs srinit, sensitivity and compactness; score --method "
                         f"{method} runs locally (drop --backend)")
    backend.check()
    request = ScoreRequest(metric=metric, data=spec, grid=grid, at=at, tolerance=tolerance, units=units,
                           seed=seed, seeds=seeds, max_memory=max_memory, backend=backend)
    scorer.check(request)
    return scorer.run(open_model(model, input_shapes=input_shapes, data=spec), request, progress)
