"""SR-init's rule: which residual blocks to remove, least sensitive to re-initialisation first."""

from __future__ import annotations

from onnxprune.analysis.model import AnalysedModel
from onnxprune.artefacts import Plan, Scores, check_fingerprint
from onnxprune.errors import InputError

UNIT_KINDS = ("blocks", "transformer-layers")

__all__ = ["check_rule", "plan_blocks"]


def check_rule(threshold: float | None, remove: int | None, target_params: float | None) -> None:
    if sum(x is not None for x in (threshold, remove, target_params)) != 1:
        raise InputError("--method srinit needs exactly one of --threshold T, --remove K, --target-params P")


def plan_blocks(am: AnalysedModel, scores: Scores | None, threshold: float | None, remove: int | None,
                target_params: float | None, force: bool = False) -> Plan:
    """Candidates: removable blocks with an identity skip (SR-init never removes the first, downsampling block
    of a stage). Exactly one rule: ``threshold`` (drop <= T), ``remove`` (the K least sensitive) or
    ``target_params`` (the fewest blocks whose removal takes at least that fraction of the parameters)."""
    if scores is None or scores.method not in ("srinit", "influence") or scores.unit_kind not in UNIT_KINDS:
        raise InputError("--method srinit needs --scores from onnxprune score --method srinit (--units blocks or "
                         "transformer-layers) or --method influence")
    check_fingerprint(scores.fingerprint, am.fingerprint, "scores file", force)
    blocks = {b.name: b for b in am.blocks}
    params_before, flops_before = am.params, am.flops
    # a unit: one block, or a transformer layer (its blocks, named by the first), removed together
    members = {u["name"]: [blocks.get(name) for name in u.get("blocks", [u["name"]])] for u in scores.units}
    candidates = sorted(
        (u for u in scores.units if all(b is not None and b.removable for b in members[u["name"]])
         and members[u["name"]][0].skip == "identity"),
        key=lambda u: (u["drop"], u["name"]),
    )
    if remove is not None:
        if not 0 <= remove <= len(candidates):
            raise InputError(f"--remove {remove}: there are {len(candidates)} removable blocks")
        chosen = candidates[:remove]
    elif threshold is not None:
        chosen = [u for u in candidates if u["drop"] <= threshold]
    else:
        if not 0 < target_params < 1:
            raise InputError(f"--target-params must be a fraction in (0, 1), got {target_params:g}")
        chosen, removed = [], 0
        for u in candidates:
            if removed >= target_params * params_before:
                break
            chosen.append(u)
            removed += sum(b.params for b in members[u["name"]])
        if removed < target_params * params_before:
            raise InputError(f"removing every candidate block takes {removed / params_before:.4f} of the "
                             f"parameters, less than --target-params {target_params:g}")
    entries = [{"name": b.name, "drop": u["drop"], "drop_se": u.get("drop_se"), "params": b.params,
                "flops": b.flops, "layers": b.layers, **({"unit": u["name"]} if "blocks" in u else {})}
               for u in chosen for b in members[u["name"]]]
    params = sum(e["params"] for e in entries)
    flops = sum(e["flops"] or 0 for e in entries)
    totals = {"blocks_removed": len(entries), "blocks": len(blocks), "params_removed": params,
              "units_removed": len(chosen), "unit_kind": scores.unit_kind,
              "params_fraction": params / params_before if params_before else 0.0, "flops_removed": flops,
              "flops_fraction": None if flops_before is None else flops / flops_before if flops_before else 0.0,
              "params_before": params_before, "flops_before": flops_before}
    rule = {"threshold": threshold, "remove": remove, "target_params": target_params}
    return Plan(method="srinit", fingerprint=am.fingerprint, input_shapes=am.shapes_record,
                layers=[], blocks=entries, totals=totals,
                granularity="blocks",
                options={"rule": {k: v for k, v in rule.items() if v is not None}, "scores_metric": scores.metric,
                         "candidates": "removable blocks with an identity skip"})
