"""Channel plans: scale a method's per-layer allocation until removing whole channels meets the target.

Each layer's sparsity is the fraction of its output channels to remove; the target is the fraction of the
model's parameters (``budget="params"``) or FLOPs (``"flops"``) that removing those channels takes away,
counted with the channel dependency analysis (a removed channel also shrinks the layers that read it, so
30 % of the channels remove about half the FLOPs). The method's allocation is scaled by bisection until the
predicted reduction meets the target; with ``round_to`` N the groups' channel counts are then rounded to
multiples of N so that the target is still met.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan
from onnxprune.errors import InputError, plural
from onnxprune.planning import allocation
from onnxprune.planning.channel_selection import CRITERIA, ChannelSelector, kept_fractions, predict, rounded_counts
from onnxprune.runtime.hardware import channel_multiple

__all__ = ["CHANNEL_TOLERANCE", "describe_blocked", "plan_channels"]

CHANNEL_TOLERANCE = 0.01  # a channel plan may miss its target by this much (channels are discrete)


def plan_channels(am: AnalysedModel, units: Sequence[allocation.Allocatable], method: str, target: float,
                  budget: str, criterion: str, round_to: int | str, coupled: str, options: dict,
                  provider: str = "cpu") -> Plan:
    """A channel plan whose kept counts are multiples of ``round_to``. ``"auto"``: the ``provider``'s channel
    multiple on this machine (onnxprune.runtime.hardware), else 8 (the smallest block of the fast kernels):
    counts stay multiples of it (past the target if need be: a layer off the kernels' blocks can run slower
    than the dense one) and only where whole blocks cannot reach the target do the steps halve, group by
    group (narrow layers). The multiple, the finest step used and why are recorded in the plan."""
    if round_to != "auto":
        if isinstance(round_to, bool) or not isinstance(round_to, int):
            raise InputError(f"--round-to must be a whole number or auto, got {round_to!r}")
        return _plan_at_multiple(am, units, method, target, budget, criterion, round_to, coupled, options)
    multiple, why = channel_multiple("cuda" if provider == "cuda" else "cpu")
    return _plan_at_multiple(am, units, method, target, budget, criterion, multiple, coupled,
                             {**options, "round_to_auto": why}, finest=1)


def _plan_at_multiple(am: AnalysedModel, units: Sequence[allocation.Allocatable], method: str, target: float,
                      budget: str, criterion: str, round_to: int, coupled: str, options: dict,
                      finest: int | None = None) -> Plan:
    if criterion not in CRITERIA:
        raise InputError(f"unknown --criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise InputError(f"--round-to must be at least 1, got {round_to}")
    params_before, flops_before = am.params, am.flops
    if budget == "flops" and flops_before is None:
        unknown = [layer.name for layer in am.layers if layer.flops is None]
        raise InputError(f"the FLOPs of {plural(len(unknown), 'layer')} are unknown (output shape not inferred: "
                         f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); use --budget params")
    total = flops_before if budget == "flops" else params_before
    if not total:
        raise InputError(f"the model has no {budget} to remove")
    if coupled not in ("prune", "keep"):
        raise InputError(f"--coupled must be prune or keep, got {coupled!r}")
    cg = am.channel_graph(coupled)
    selector = ChannelSelector(cg, criterion)

    def outcome(ratios: dict[str, float], counts: dict | None = None):
        remove, choices = selector.choose(ratios, 1, counts)
        params, flops = predict(cg, remove)
        return (flops if budget == "flops" else params) / total, ratios, remove, choices, params, flops

    def achieved(t: float):
        try:
            result = allocation.allocate(units, method, t, "params") if t > 0 else None
        except InputError:  # this method cannot reach t under its bounds: too high, search lower
            return None
        return outcome(result.sparsities if result else {})

    lo, hi = 0.0, max(u.hi for u in units) if units else 0.0
    best = achieved(0.0)
    over = None  # the smallest outcome above the target (channels come in steps: the target may sit between two)
    for _ in range(40):
        mid = (lo + hi) / 2
        cur = achieved(mid)
        if cur is None:
            hi = mid
            continue
        if abs(cur[0] - target) < abs(best[0] - target):
            best = cur
        if cur[0] < target:
            lo = mid
        else:
            hi = mid
            if over is None or cur[0] < over[0]:
                over = cur
        if hi - lo < 1e-5:
            break
    if abs(best[0] - target) > CHANNEL_TOLERANCE:
        if over is None:
            blocked_groups = sum(not g["prunable"] for g in cg.groups())
            inner = sum(bool(layer.scope) for layer in am.layers)
            raise InputError(
                f"removing channels with {method} reaches at most {best[0]:.3f} of the {budget} of this model "
                f"(target {target:g}; {plural(blocked_groups, 'channel group')} cannot shrink"
                + (f", {plural(inner, 'layer')} inside If / Loop / Scan bodies keep their channels" if inner else "")
                + ", see onnxprune inspect); lower --target-sparsity or prune unstructured"
            )
        best = over  # the next whole-channel step past the target
    preferred = round_to
    if round_to > 1:  # the continuous allocation, then counts rounded so that the target is still met
        ratios = best[1]
        counts, round_to = rounded_counts(cg, ratios, round_to, lambda c: outcome(ratios, c)[0] >= target - 1e-9,
                                          finest)
        best = outcome(ratios, counts)
    frac, ratios, remove, choices, params, flops = best
    groups = cg.groups()
    blocked = [g for g in groups if not g["prunable"]]
    blocked_layers = {n for g in blocked for n in g["layers"]} - {n for g in groups if g["prunable"] for n in g["layers"]}
    ratios = {name: (0.0 if name in blocked_layers else r) for name, r in ratios.items()}
    kept = kept_fractions(cg, remove)
    plan_layers = []
    for u in units:
        elems = cg.produced.get(u.name, [])
        after = len(cg.kept(elems, remove))
        plan_layers.append({"name": u.name, "sparsity": (1 - after / len(elems)) if elems else 0.0,
                            "granularity": "channel", "method": method, "weight": u.layer.weight,
                            "channels": len(elems), "channels_after": after,
                            "input_kept": kept.get(u.name, (1.0, 1.0))[0], "params": u.n, "flops": u.flops,
                            "allocated_sparsity": ratios.get(u.name, 0.0)})
    totals = {"target": target, "budget": budget, "sparsity": frac,
              "params_fraction_removed": params / params_before if params_before else 0.0,
              "flops_fraction_removed": None if flops_before is None else flops / flops_before if flops_before else 0.0,
              "params_before": params_before, "params_after": params_before - params,
              "flops_before": flops_before, "flops_after": None if flops_before is None else flops_before - flops,
              "channels_removed": sum(c.removed for c in choices), "groups": len(choices),
              "groups_changed": sum(c.removed > 0 for c in choices), "groups_blocked": len(blocked)}
    if round_to < preferred:
        options = {**options, "round_to_auto": f"{options.get('round_to_auto', '')}; whole blocks of {preferred} "
                                               f"reach at most part of the target: narrow groups cut in "
                                               f"steps of {round_to}"}
    options = {**options, "criterion": criterion, "round_to": round_to, "coupled": coupled,
               "group_removed": [{"layers": c.layers, "channels": c.channels, "removed": c.removed}
                                 for c in choices],
               "blocked": describe_blocked(blocked)}
    return Plan(method=method, fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                layers=plan_layers, totals=totals, budget=budget,
                granularity="channel", options=options)


def describe_blocked(groups: list[dict]) -> dict[str, str]:
    """Groups that keep their channels, as {"first layers ...": why} for plans and reports."""
    return {", ".join(g["layers"][:3]) + (" ..." if len(g["layers"]) > 3 else ""): g["reason"] for g in groups}
