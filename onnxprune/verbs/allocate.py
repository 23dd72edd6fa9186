"""``allocate``: a plan under a budget, by a method of onnxprune.planning.registry."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from onnxprune.artefacts import Plan, Scores, check_fingerprint, load_scores
from onnxprune.errors import InputError
from onnxprune.planning.allocation import Allocatable
from onnxprune.planning.blocks import check_rule, plan_blocks
from onnxprune.planning.channels import plan_channels
from onnxprune.planning.registry import PLANNERS
from onnxprune.planning.sparsity import plan_search, plan_sparsity
from onnxprune.runtime import data as rdata
from onnxprune.verbs.loading import InputShapesLike, ModelLike, open_model

__all__ = ["allocate"]


def allocate(
    model: ModelLike,
    *,
    target_sparsity: float | None = None,
    method: str = "capacity",
    scores: Scores | str | os.PathLike | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    keep_dense: tuple[str, ...] | list[str] = (),
    budget: str = "params",
    force: bool = False,
    threshold: float | None = None,
    remove: int | None = None,
    target_params: float | None = None,
    data: rdata.DataSpec | str | os.PathLike | None = None,
    iterations: int = 150,
    seed: int = 0,
    granularity: str = "unstructured",
    criterion: str = "l2",
    round_to: int | str = "auto",
    coupled: str = "prune",
    progress: Callable[[int, int | None], None] | None = None,
    input_shapes: InputShapesLike = None,
    **data_options,
) -> Plan:
    """A plan: a sparsity for every prunable layer so that the budget-weighted total equals the target.

    With ``granularity="channel"`` each layer's sparsity is the fraction of its output channels to remove,
    and the target is the fraction of the model's parameters (``budget="params"``) or FLOPs (``"flops"``)
    that removing those channels takes away, counted with the channel dependency analysis (a removed channel
    also shrinks the layers that read it, so 30 % of the channels remove about half the FLOPs): the method's
    allocation is scaled by bisection until the predicted reduction meets the target; with ``round_to`` N the
    groups' channel counts are then rounded to multiples of N so that the target is still met (ONNX Runtime's
    fast CPU convolutions work on blocks of 8 channels with AVX2, 16 with AVX-512); ``round_to="auto"`` (the
    default) picks the multiple for this machine and ``provider`` (onnxprune.planning.channels.plan_channels),
    an explicit N gives the same plan on every machine. ``coupled="keep"`` leaves
    the channels written by several layers (residual streams) whole and prunes only single-producer groups.

    ``search`` measures whole pruned models on calibration data (``data``: an .npz path or a DataSpec, and
    the DataSpec options as keywords), see onnxprune.planning.search; every other method is computed from
    the weights and/or the scores alone. ``srinit`` removes residual blocks by one rule: ``threshold``,
    ``remove`` or ``target_params`` (onnxprune.planning.blocks).

    FLOPs are counted at ``input_shapes`` (see onnxprune.api.inspect), else at the sizes the scores were made
    at, else at the sizes ``data`` fixes; a FLOP budget with a dimension still unknown is refused.
    """
    planner = PLANNERS.get(method)
    if planner is None:
        raise InputError(f"unknown allocation method {method!r}; use one of {', '.join(PLANNERS)}")
    sc = _scores(scores)
    shapes = input_shapes or (sc.input_shapes if sc is not None else None)
    spec = rdata.DataSpec.of(data, **data_options) if planner.kind == "measured" else None
    if planner.kind == "blocks":
        check_rule(threshold, remove, target_params)
        am = open_model(model, input_shapes=shapes)
        return plan_blocks(am, sc, threshold, remove, target_params, force)
    if target_sparsity is None:
        raise InputError(f"--method {method} needs --target-sparsity S")
    if granularity not in ("unstructured", "channel"):
        raise InputError(f"allocate --granularity must be unstructured or channel, got {granularity!r}")
    if granularity == "channel" and planner.kind == "measured":
        raise InputError("--method search measures unstructured sparsity; "
                         "use another method with --granularity channel")
    if not 0.0 <= target_sparsity < 1.0:
        raise InputError(f"--target-sparsity must be in [0, 1), got {target_sparsity:g}")
    if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
        raise InputError(f"need 0 <= --min-sparsity <= --max-sparsity < 1, got {min_sparsity:g} and {max_sparsity:g}")
    if budget not in ("params", "flops"):
        raise InputError(f"unknown --budget {budget!r}; use params or flops")
    am = open_model(model, input_shapes=shapes, data=spec)
    if budget == "flops":
        am.require_input_sizes("FLOPs")
    layers = am.owned_layers
    if planner.needs_scores and sc is None:
        raise InputError(f"--method {method} needs --scores scores.json (from onnxprune score)")
    importance, curves = {}, {}
    if sc is not None:
        check_fingerprint(sc.fingerprint, am.fingerprint, "scores file", force)
        importance = {name: u.get("importance") for name, u in sc.by_name().items()}
        if method == "sensitivity":
            if sc.method != "sensitivity":
                raise InputError("--method sensitivity needs scores from onnxprune score --method sensitivity")
            curves = sc.curves()
    names = {layer.name for layer in layers}
    unknown = [n for n in keep_dense if n not in names]
    if unknown:
        raise InputError(f"--keep-dense names unknown layer(s) {unknown}; see onnxprune inspect for the names")
    units = [
        Allocatable(
            name=layer.name, n=int(np.prod(layer.weight_shape)), flops=am.weight_flops(layer), layer=layer,
            importance=importance.get(layer.name), lo=0.0 if layer.name in keep_dense else min_sparsity,
            hi=0.0 if layer.name in keep_dense else max_sparsity, curve=curves.get(layer.name),
        )
        for layer in layers
    ]
    options = {"min_sparsity": min_sparsity, "max_sparsity": max_sparsity, "keep_dense": list(keep_dense),
               **({"scores_method": sc.method, "scores_metric": sc.metric} if sc else {})}
    if planner.kind == "measured":
        return plan_search(am, units, target_sparsity, budget, sc, spec, iterations, seed, progress, options)
    if granularity == "channel":
        return plan_channels(am, units, method, target_sparsity, budget, criterion, round_to, coupled, options,
                             spec.provider if spec is not None else data_options.get("provider", "cpu"))
    return plan_sparsity(am, units, method, target_sparsity, budget, options)


def _scores(scores: Scores | str | os.PathLike | None) -> Scores | None:
    if scores is None or isinstance(scores, Scores):
        return scores
    return load_scores(scores)
