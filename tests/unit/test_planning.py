"""Planners: the allocation rules, the registry, channel plans, block plans, channel selection, the search."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import api
from onnxprune.artefacts import Scores
from onnxprune.errors import InputError
from onnxprune.planning import allocation, channel_selection
from onnxprune.planning.allocation import TOLERANCE, Allocatable, allocate, allocate_sparsities
from onnxprune.planning.blocks import check_rule, plan_blocks
from onnxprune.planning.channel_selection import ChannelSelector
from onnxprune.planning.channels import CHANNEL_TOLERANCE
from onnxprune.planning.registry import LAYER_METHODS, PLANNERS
from onnxprune.tensors.weights import get_weight
from tests.graphs import tensor
from tests.unit.nets import analysed, conv_chain, layer, mlp, residual, save, stable_mask, write_npz

MLP = ((48, 40, 32, 24, 5), (1.0, 0.5, 2.0, 0.3))  # 4 layers of 1920, 1280, 768 and 120 weights
IMPORTANCE = (0.3, 1.0, 0.6, 0.8)
CURVATURE = (2.0, 1.0, 4.0, 0.5)  # sensitivity curves k * s^2
GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99)


@pytest.fixture(scope="module")
def mlp_am():
    return analysed(mlp(*MLP))


def make_units(am, bounds=None) -> list[Allocatable]:
    """Allocatables of the mlp's layers, FLOPs a different multiple of the weights in each, with importance
    and sensitivity curves; ``bounds``: layer index -> (lo, hi)."""
    bounds = bounds or {}
    return [Allocatable(name=lay.name, n=lay.params, flops=lay.params * (4 - i), layer=lay,
                        importance=IMPORTANCE[i], curve=[(s, CURVATURE[i] * s * s) for s in GRID],
                        lo=bounds.get(i, (0.0, 0.99))[0], hi=bounds.get(i, (0.0, 0.99))[1])
            for i, lay in enumerate(am.owned_layers)]


def budget_total(units, s, budget: str) -> float:
    w = np.array([u.n if budget == "params" else u.flops for u in units], np.float64)
    return float(np.dot(w, s) / w.sum())


# ---------------------------------------------------------------- the allocation rules

@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("target", [0.3, 0.75])
@pytest.mark.parametrize("method", allocation.RULES)
def test_rule_meets_the_target(mlp_am, method, target, budget):
    units = make_units(mlp_am)
    result = allocate(units, method, target, budget)
    assert abs(result.total - target) <= TOLERANCE
    s = np.array([result.sparsities[u.name] for u in units])
    assert result.total == pytest.approx(budget_total(units, s, budget))
    assert result.total_params == pytest.approx(budget_total(units, s, "params"))
    for u in units:
        assert result.sparsities[u.name] == result.zeros[u.name] / u.n


@pytest.mark.parametrize("method", allocation.RULES)
def test_rule_respects_the_bounds(mlp_am, method):
    bounds = {0: (0.0, 0.6), 1: (0.5, 0.99), 3: (0.0, 0.0)}
    units = make_units(mlp_am, bounds)
    result = allocate(units, method, 0.5, "params")
    assert abs(result.total - 0.5) <= TOLERANCE
    for u in units:  # rounding to whole weights may cross a bound by less than one weight
        assert u.lo - 1 / u.n < result.sparsities[u.name] <= u.hi
    assert result.zeros[units[3].name] == 0


@pytest.mark.parametrize("method", sorted(set(allocation.RULES) - {"uniform"}))
def test_rounding_keeps_the_lower_bound(mlp_am, method):
    units = make_units(mlp_am, {i: (0.5003, 0.99) for i in range(4)})
    result = allocate(units, method, 0.55, "params")
    assert all(result.zeros[u.name] >= np.ceil(u.lo * u.n) for u in units)


@pytest.mark.parametrize("method", ["capacity", "erk"])
def test_density_is_proportional_to_importance(mlp_am, method):
    units = make_units(mlp_am)
    s = allocate_sparsities(units, method, 0.6)
    imp = np.array(IMPORTANCE if method == "capacity" else
                   [sum(u.layer.weight_shape) / u.n for u in units])
    free = (s > 0) & (s < 0.99)
    assert free.sum() >= 2
    ratio = (1 - s[free]) / imp[free]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
    order = np.argsort(imp)  # more important, never sparser
    assert (np.diff(s[order]) <= 1e-12).all()
    result = allocate(units, method, 0.6)
    got = np.array([result.sparsities[u.name] for u in units])
    assert all(got[i] <= got[j] + 1 / units[i].n for i in range(4) for j in range(4) if imp[i] > imp[j])


def test_uniform_gives_every_layer_the_same_sparsity(mlp_am):
    units = make_units(mlp_am)
    result = allocate(units, "uniform", 0.45)
    for u in units:
        assert abs(result.sparsities[u.name] - 0.45) <= 1 / u.n


def lamp_scores(w: np.ndarray) -> np.ndarray:
    """Oracle: LAMP score of each weight (flat, in place order): w^2 over the sum of w'^2 with |w'| >= |w|."""
    order = np.argsort(np.abs(w).reshape(-1), kind="stable")
    w2 = np.square(w.reshape(-1)[order].astype(np.float64))
    out = np.empty_like(w2)
    out[order] = w2 / np.cumsum(w2[::-1])[::-1]
    return out


@pytest.mark.parametrize("method,score", [("global", lambda w: np.abs(w).reshape(-1)), ("lamp", lamp_scores)])
def test_threshold_rules_prune_below_one_threshold(mlp_am, method, score):
    """Every pruned weight scores at most every kept one, except in layers held at their upper bound."""
    units = make_units(mlp_am)
    result = allocate(units, method, 0.7)
    pruned, kept, capped = [], [], 0
    for u in units:
        w = np.asarray(get_weight(u.layer))
        mask = stable_mask(w, result.zeros[u.name]).reshape(-1)
        pruned.append(score(w)[~mask])
        if result.zeros[u.name] < int(u.hi * u.n):
            kept.append(score(w)[mask])
        else:
            capped += 1
    assert capped < len(units) - 1
    assert np.concatenate(pruned).max() <= np.concatenate(kept).min()


def curve_cost(units, s) -> float:
    return sum(float(np.interp(x, *zip(*u.curve, strict=True))) for u, x in zip(units, s, strict=True))


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_sensitivity_has_the_least_total_drop(mlp_am, budget):
    units = make_units(mlp_am)
    best = curve_cost(units, allocate_sparsities(units, "sensitivity", 0.6, budget))
    for other in set(allocation.RULES) - {"sensitivity"}:
        s = allocate_sparsities(units, other, 0.6, budget)
        assert budget_total(units, s, budget) == pytest.approx(0.6, abs=TOLERANCE)
        assert best <= curve_cost(units, s) + 1e-9, other


@pytest.mark.parametrize("method,target,edit,match", [
    ("magic", 0.5, {}, "unknown allocation method"),
    ("capacity", 0.5, {"importance": None}, "no importance"),
    ("sensitivity", 0.5, {"curve": None}, "no sensitivity curve"),
    ("uniform", 0.5, {"hi": 0.2}, "cannot be met"),
    ("uniform", 1.0, {}, "must be in"),
])
def test_allocate_refuses(mlp_am, method, target, edit, match):
    units = make_units(mlp_am)
    for k, v in edit.items():
        for u in units:
            setattr(u, k, v)
    with pytest.raises(InputError, match=match):
        allocate(units, method, target)


def test_allocate_refuses_no_layers():
    with pytest.raises(InputError, match="no prunable layers"):
        allocate([], "uniform", 0.5)


# ---------------------------------------------------------------- the registry

def test_planners_in_order():
    assert list(PLANNERS) == ["capacity", "uniform", "global", "lamp", "erk", "sensitivity", "search", "srinit"]
    assert LAYER_METHODS == ("capacity", "uniform", "global", "lamp", "erk", "sensitivity", "search")
    assert {name for name, p in PLANNERS.items() if p.kind == "rule"} == set(allocation.RULES)
    assert {name for name, p in PLANNERS.items() if p.needs_scores} == {"capacity", "sensitivity", "srinit"}
    assert [name for name, p in PLANNERS.items() if p.needs_data] == ["search"]
    assert api.ALLOCATION_METHODS == tuple(PLANNERS)


# ---------------------------------------------------------------- unstructured plans and the search

@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    return save(mlp(*MLP), tmp_path_factory.mktemp("mlp") / "mlp.onnx")


def test_unstructured_plan_records_the_allocation(mlp_path):
    plan = api.allocate(mlp_path, target_sparsity=0.5, method="lamp", keep_dense=["l3"])
    assert abs(plan.totals["sparsity"] - 0.5) <= TOLERANCE
    layers = {lay["name"]: lay for lay in plan.layers}
    assert layers["l3"]["zeros"] == 0 and plan.totals["zeros"] == sum(lay["zeros"] for lay in plan.layers)
    assert plan.fingerprint == api.inspect(mlp_path).fingerprint


def test_search_meets_the_target_and_is_reproducible(mlp_path, tmp_path):
    data = write_npz(tmp_path / "d.npz", 32, 48)
    plans = [api.allocate(mlp_path, target_sparsity=0.6, method="search", data=data, iterations=12, seed=seed,
                          provider="cpu") for seed in (3, 3, 4)]
    for plan in plans:
        assert abs(plan.totals["sparsity"] - 0.6) <= TOLERANCE
        log = plan.options["search"]
        assert log["final_loss"] <= log["start_loss"] == pytest.approx(min(log["seeds"].values()), abs=1e-6)
        assert log["evaluations"] == 12 + len(log["seeds"])
    assert plans[0].sparsities() == plans[1].sparsities()
    assert plans[0].seed == 3 and plans[2].seed == 4


# ---------------------------------------------------------------- channel plans

@pytest.fixture(scope="module")
def chain_path(tmp_path_factory):
    return save(conv_chain((24, 40, 56)), tmp_path_factory.mktemp("chain") / "chain.onnx")


@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("method,target", [("uniform", 0.4), ("global", 0.6), ("erk", 0.2)])
def test_channel_plan_meets_the_target(chain_path, tmp_path, method, target, budget):
    plan = api.allocate(chain_path, target_sparsity=target, method=method, granularity="channel", budget=budget,
                        round_to=1)
    assert abs(plan.totals["sparsity"] - target) <= CHANNEL_TOLERANCE
    auto = api.allocate(chain_path, target_sparsity=target, method=method, granularity="channel", budget=budget)
    assert auto.totals["sparsity"] >= target - CHANNEL_TOLERANCE  # met, possibly past it on whole blocks
    if auto.options["round_to"] >= 8:
        assert all((e["channels"] - e["channels_after"]) % auto.options["round_to"] == 0 for e in auto.layers)
    key = "params_fraction_removed" if budget == "params" else "flops_fraction_removed"
    assert plan.totals[key] == plan.totals["sparsity"]
    assert 1 - plan.totals[f"{budget}_after"] / plan.totals[f"{budget}_before"] == pytest.approx(plan.totals[key])
    assert {lay["name"]: lay["channels"] for lay in plan.layers} == {"c1": 24, "c2": 40, "c3": 56, "fc": 5}
    pruned = api.inspect(api.apply(chain_path, plan, tmp_path / "pruned.onnx").path)
    assert (pruned.params, pruned.flops) == (plan.totals["params_after"], plan.totals["flops_after"])


def test_auto_rounding_leaves_the_block_only_where_whole_blocks_cannot_reach(tmp_path, monkeypatch):
    """With a 16-channel block, a 16-channel layer can only go to 8 and a 64-channel one stays on multiples
    of 16: past what whole blocks reach, only the narrow group takes the finer step."""
    from onnxprune.planning import channels

    monkeypatch.setattr(channels, "channel_multiple", lambda provider: (16, "blocks of 16 (test)"))
    path = save(conv_chain((16, 64, 64)), tmp_path / "chain.onnx")
    coarse = api.allocate(path, target_sparsity=0.3, method="uniform", granularity="channel", budget="params")
    assert coarse.options["round_to"] == 16
    removed = {e["name"]: e["channels"] - e["channels_after"] for e in coarse.layers}
    assert removed["c1"] == 0 and removed["c2"] % 16 == removed["c3"] % 16 == 0

    # whole blocks of 16 remove 0.89 of the params at most (c2 and c3 at 16): 0.9 needs c1 at 8
    fine = api.allocate(path, target_sparsity=0.9, method="uniform", granularity="channel", budget="params")
    removed = {e["name"]: e["channels"] - e["channels_after"] for e in fine.layers}
    assert fine.totals["sparsity"] >= 0.9 - CHANNEL_TOLERANCE
    assert fine.options["round_to"] == 8 and "steps of 8" in fine.options["round_to_auto"]
    assert removed == {"c1": 8, "c2": 48, "c3": 48, "fc": 0}


def test_channel_plan_rounds_to_multiples(chain_path):
    plan = api.allocate(chain_path, target_sparsity=0.5, method="uniform", granularity="channel", round_to=2)
    assert plan.totals["sparsity"] >= 0.5 - 1e-9
    assert abs(plan.totals["sparsity"] - 0.5) <= CHANNEL_TOLERANCE
    groups = plan.options["group_removed"]
    assert groups and all((g["channels"] - g["removed"]) % 2 == 0 for g in groups)
    assert all(lay["channels_after"] % 2 == 0 for lay in plan.layers if lay["name"] != "fc")


def test_channel_plan_refuses_an_unreachable_target(chain_path):
    with pytest.raises(InputError, match="reaches at most"):
        api.allocate(chain_path, target_sparsity=0.95, method="uniform", granularity="channel", max_sparsity=0.5)


# ---------------------------------------------------------------- block plans (SR-init's rule)

def block_scores(am, drops: dict[str, float], fingerprint: str | None = None) -> Scores:
    return Scores(method="srinit", fingerprint=fingerprint or am.fingerprint, unit_kind="blocks",
                  units=[{"name": n, "drop": d} for n, d in drops.items()], metric="top1")


@pytest.fixture(scope="module")
def blocks_am():
    return analysed(residual(3))


DROPS = {"add0": 0.5, "add1": 0.1, "add2": 0.3}


@pytest.mark.parametrize("rule,chosen", [
    ({"remove": 1}, ["add1"]),
    ({"remove": 3}, ["add1", "add2", "add0"]),
    ({"remove": 0}, []),
    ({"threshold": 0.3}, ["add1", "add2"]),
    ({"threshold": 0.05}, []),
    ({"target_params": 0.2}, ["add1"]),
    ({"target_params": 0.5}, ["add1", "add2"]),
])
def test_block_plan_rules(blocks_am, rule, chosen):
    args = {"threshold": None, "remove": None, "target_params": None, **rule}
    plan = plan_blocks(blocks_am, block_scores(blocks_am, DROPS), **args)
    assert [b["name"] for b in plan.blocks] == chosen
    params = sum(b.params for b in blocks_am.blocks if b.name in chosen)
    assert plan.totals["params_removed"] == params
    assert plan.totals["params_fraction"] == params / blocks_am.params
    assert plan.fingerprint == blocks_am.fingerprint


@pytest.mark.parametrize("rule,match", [
    ({"remove": 4}, "3 removable"),
    ({"target_params": 0.99}, "less than"),
    ({"target_params": 1.5}, "fraction"),
])
def test_block_plan_refuses_impossible_rules(blocks_am, rule, match):
    args = {"threshold": None, "remove": None, "target_params": None, **rule}
    with pytest.raises(InputError, match=match):
        plan_blocks(blocks_am, block_scores(blocks_am, DROPS), **args)


def test_block_plan_skips_blocks_that_cannot_go():
    proto = residual(2)
    proto.graph.output.append(tensor("ra0", "N", 4, 6, 6))
    am = analysed(proto)
    plan = plan_blocks(am, block_scores(am, {"add0": 0.0, "add1": 0.2}), None, 1, None)
    assert [b["name"] for b in plan.blocks] == ["add1"]


def test_block_plan_checks_the_scores(blocks_am):
    other = block_scores(blocks_am, DROPS, fingerprint="0" * 64)
    with pytest.raises(InputError, match="another model"):
        plan_blocks(blocks_am, other, None, 1, None)
    assert [b["name"] for b in plan_blocks(blocks_am, other, None, 1, None, force=True).blocks] == ["add1"]
    wrong = Scores(method="capacity", fingerprint=blocks_am.fingerprint, units=[])
    with pytest.raises(InputError, match="srinit"):
        plan_blocks(blocks_am, wrong, None, 1, None)
    with pytest.raises(InputError, match="exactly one"):
        check_rule(0.1, 1, None)


# ---------------------------------------------------------------- channel selection

@pytest.mark.parametrize("criterion,norm", [("l1", 1), ("l2", 2)])
def test_selector_removes_the_lowest_norm_channels_first(criterion, norm):
    am = analysed(conv_chain((8, 6)))
    cg = am.channel_graph()
    w1 = np.asarray(get_weight(layer(am, "c1")))
    norms = np.linalg.norm(w1.reshape(8, -1), ord=norm, axis=1)
    for removed in (1, 3, 6):
        remove, choices = ChannelSelector(cg, criterion).choose({"c1": removed / 8})
        kept = cg.kept(cg.produced["c1"], remove)
        assert sorted(kept) == sorted(np.argsort(norms)[removed:].tolist())
        assert choices[0].layers == ["c1"] and choices[0].removed == removed
        assert all(c.removed == 0 for c in choices[1:])


def test_selector_computes_the_norms_once(monkeypatch):
    cg = analysed(conv_chain((8, 6))).channel_graph()
    calls = []
    real = channel_selection.filter_norms
    monkeypatch.setattr(channel_selection, "filter_norms", lambda layer, c: calls.append(layer.name) or real(layer, c))
    selector = ChannelSelector(cg)
    first = selector.choose({"c1": 0.5, "c2": 0.5})
    norms = selector._norms
    second = selector.choose({"c1": 0.5, "c2": 0.5})
    assert first[0] == second[0] and len(first[0]) == 4 + 3
    assert selector._norms is norms
    assert sorted(calls) == sorted(cg.produced)


def test_selector_refuses_an_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        ChannelSelector(analysed(conv_chain()).channel_graph(), "l7")
