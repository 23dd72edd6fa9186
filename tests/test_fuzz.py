"""Random graphs through every command and granularity (hypothesis).

For each generated graph, through the CLI (in-process): inspect, score (capacity; SR-init where the graph
has removable blocks; sensitivity or compactness on some), allocate (a drawn method and target; channel
plans; sensitivity or search on some), apply (unstructured, n:m, channel with or without refit, blocks),
eval and finetune (a quarter of the examples). Nothing may crash: a command either succeeds or fails with exit 2 and
one clean line (something not supported). Every written model passes onnx.checker (full_check) and runs in
ONNX Runtime, checked here independently of apply's own check, and the oracles of DESIGN.md hold:
unstructured = original times an independently computed 0/1 mask; channel shrink = original with the
removed channels zeroed (exact, on the same graph); block removal = original with the branch zeroed at its
Add; a zero plan gives bit-identical outputs.

ONNXPRUNE_FUZZ_EXAMPLES sets the examples per family (default 100, so 200 per run, the same ones every
run); `make fuzz` runs 2,000 new ones per family with shrinking.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxprune.cli import main
from tests.fuzz_graphs import CLASSES, decoder_graphs, float16_graphs, sample_input, sequence_graphs, vision_graphs
from tests.test_blocks import zero_branches
from tests.test_channels import shrink_vs_mask

EXAMPLES = int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", "100"))
OUTCOMES: Counter = Counter()  # what happened, over all examples (printed at the end, asserted on)
ERRORS: Counter = Counter()  # the clean errors met, by their first words


INPUT_SHAPE: list[str] = []  # --input-shape for the graph under test when its height and width are dynamic


def cli(*args, allow_error: bool = True) -> dict | None:
    """Run a command; return its --json output, or None after a clean bad-input error (exit 2, one line)."""
    shape = INPUT_SHAPE if args[0] in ("inspect", "allocate", "apply", "prune") else []
    result = CliRunner().invoke(main, [*map(str, args), *shape, "--json"])
    label = f"{args[0]} {' '.join(str(a) for a in args if str(a).startswith('--') and a != '--json')}"
    if result.exit_code == 2 and allow_error:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
        OUTCOMES[f"{args[0]}: clean error"] += 1
        ERRORS[" ".join(lines[0].split()[:40])] += 1
        return None
    assert result.exit_code == 0, (label, result.exit_code, result.stderr, repr(result.exception))
    OUTCOMES[f"{args[0]}: ok"] += 1
    return json.loads(result.stdout) if result.stdout.strip() else {}


def valid(path: Path, x: np.ndarray) -> np.ndarray:
    """Independent check of a written model: full onnx.checker, a run in ONNX Runtime; returns its logits."""
    onnx.checker.check_model(str(path), full_check=True)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert y.shape == (len(x), CLASSES) and np.isfinite(y).all()
    return y


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def check_unstructured(original: onnx.ModelProto, pruned: Path, plan: dict) -> None:
    """Each planned weight equals the original times a 0/1 mask that zeroes exactly its k smallest |w|."""
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pruned)).graph.initializer}
    for layer in plan["layers"]:
        w = before[layer["weight"]]
        k = int(round(layer["sparsity"] * w.size))
        mask = np.ones(w.size, np.float32)
        mask[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = 0
        np.testing.assert_array_equal(after[layer["weight"]], w * mask.reshape(w.shape))


def pipeline(proto: onnx.ModelProto, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = d / "model.onnx"
        onnx.save(proto, str(model))
        x = sample_input(proto, 24)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        INPUT_SHAPE[:] = ["--input-shape", "input:" + ",".join(["1", *map(str, x.shape[1:])])] if any(
            d.dim_param for d in dims[1:]) else []
        if INPUT_SHAPE:
            OUTCOMES["dynamic height and width"] += 1
        ops = {n.op_type for n in proto.graph.node}
        OUTCOMES["recurrent layer"] += bool(ops & {"LSTM", "GRU", "RNN"})
        OUTCOMES["layers in If branches"] += "If" in ops
        np.savez(d / "data.npz", x=x, y=np.random.default_rng(0).integers(0, CLASSES, len(x)))
        reference = run(proto, x)

        info = cli("inspect", model, allow_error=False)
        assert info["totals"]["layers"] > 0
        metric = data.draw(st.sampled_from(["l2", "mean_abs", "stable_rank", "effective_rank"]))
        cli("score", model, "--metric", metric, "-o", d / "scores.json", allow_error=False)

        # a zero plan changes nothing, bit for bit
        cli("allocate", model, "--method", "uniform", "--target-sparsity", "0", "-o", d / "zero.json",
            allow_error=False)
        cli("apply", model, d / "zero.json", "-o", d / "zero.onnx", allow_error=False)
        np.testing.assert_array_equal(valid(d / "zero.onnx", x), reference)

        # unstructured and n:m from a drawn allocation
        method = data.draw(st.sampled_from(["uniform", "global", "lamp", "erk", "capacity"]))
        target = data.draw(st.sampled_from([0.3, 0.5, 0.7, 0.9]))
        budget = data.draw(st.sampled_from(["params", "flops"]))
        plan = cli("allocate", model, "--method", method, "--target-sparsity", target, "--budget", budget,
                   *(["--scores", d / "scores.json"] if method == "capacity" else []), "-o", d / "plan.json")
        if plan is not None:
            cli("apply", model, d / "plan.json", "-o", d / "u.onnx", allow_error=False)
            valid(d / "u.onnx", x)
            check_unstructured(proto, d / "u.onnx", plan)
            # the same plan with the zeros chosen from the data: every planned zero made, a valid model
            criterion = data.draw(st.sampled_from(["wanda", "obs"]))
            out = cli("apply", model, d / "plan.json", "-o", d / "da.onnx", "--criterion", criterion, "--data",
                      d / "data.npz", allow_error=False)
            valid(d / "da.onnx", x)
            assert out["totals"]["zeros"] == sum(layer["zeros"] for layer in plan["layers"]), out["totals"]
            OUTCOMES[f"data-aware {criterion}"] += 1
            OUTCOMES["data-aware magnitude fallback"] += bool(out["totals"].get("magnitude_fallback"))
            if cli("apply", model, d / "plan.json", "--granularity", "n:m", "-o", d / "nm.onnx") is not None:
                valid(d / "nm.onnx", x)

        # channels: the CLI path (plan, apply, optionally refit) must give valid models; the exact oracle
        # runs on the same graph through the same channel analysis
        ratio = data.draw(st.sampled_from([0.25, 0.5]))
        refit = data.draw(st.booleans())
        if cli("allocate", model, "--method", "uniform", "--granularity", "channel", "--budget", budget,
               "--target-sparsity", ratio, "-o", d / "ch.json") is not None:
            out = cli("apply", model, d / "ch.json", "-o", d / "ch.onnx",
                      *(["--data", d / "data.npz"] if refit else []))
            if out is not None:
                valid(d / "ch.onnx", x)
        half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
        shrunk, masked, removed = shrink_vs_mask(proto, ratio) if not half else (None, None, 0)  # float32 masks
        if removed:
            np.testing.assert_allclose(run(onnx.load_from_string(shrunk), x), run(onnx.load_from_string(masked), x),
                                       atol=1e-4, rtol=1e-4)
            OUTCOMES["channel oracle"] += 1

        # blocks: SR-init scores, remove the least important block, compare with the zeroed branch
        removable = [b for b in info["blocks"] if b["removable"] and b["skip"] == "identity"]
        if removable:
            cli("score", model, "--method", "srinit", "--data", d / "data.npz", "-o", d / "sr.json",
                allow_error=False)
            cli("allocate", model, "--method", "srinit", "--scores", d / "sr.json", "--remove", "1",
                "-o", d / "blocks.json", allow_error=False)
            cli("apply", model, d / "blocks.json", "-o", d / "blocks.onnx", allow_error=False)
            gone = json.loads((d / "blocks.json").read_text())["blocks"][0]["name"]
            from onnxprune import inspect

            block = next(b for b in inspect(model).blocks if b.name == gone)
            got = valid(d / "blocks.onnx", x)
            if not half:  # (the oracle's zeroing is float32)
                np.testing.assert_allclose(got, run(onnx.load_from_string(zero_branches(model, [block])), x),
                                           atol=1e-4, rtol=1e-4)
                OUTCOMES["block oracle"] += 1

        # the measured allocations, on a third of the examples each (they run the model many times)
        measured = data.draw(st.sampled_from(["sensitivity", "search", "compactness"]))
        OUTCOMES[measured] += 1
        if measured == "sensitivity":
            if cli("score", model, "--method", "sensitivity", "--grid", "0.5", "--data", d / "data.npz",
                   "-o", d / "sens.json", allow_error=False) is not None:
                if cli("allocate", model, "--method", "sensitivity", "--scores", d / "sens.json",
                       "--target-sparsity", "0.4", "-o", d / "sens_plan.json") is not None:
                    cli("apply", model, d / "sens_plan.json", "-o", d / "sens.onnx", allow_error=False)
                    valid(d / "sens.onnx", x)
        elif measured == "search":
            if cli("allocate", model, "--method", "search", "--target-sparsity", "0.5", "--iterations", "8",
                   "--data", d / "data.npz", "-o", d / "search.json") is not None:
                cli("apply", model, d / "search.json", "-o", d / "search.onnx", allow_error=False)
                valid(d / "search.onnx", x)
        else:
            cli("score", model, "--method", "compactness", "--data", d / "data.npz", "-o", d / "comp.json",
                allow_error=False)

        # eval and finetune on one of the outputs
        pruned = d / ("u.onnx" if (d / "u.onnx").exists() else "zero.onnx")
        result = cli("eval", pruned, "--data", d / "data.npz", allow_error=False)
        assert result["samples"] == len(x)
        if data.draw(st.integers(0, 3)) == 0:  # finetune is the slow one: a quarter of the examples
            trainable = not {n.op_type for n in proto.graph.node} & {"LSTM", "GRU", "RNN", "If"}
            if cli("finetune", pruned, "--data", d / "data.npz", "--epochs", "1", "--batch-size", "8",
                   "--teacher", model, "-o", d / "tuned.onnx", allow_error=not trainable) is not None:
                valid(d / "tuned.onnx", x)


# Shrinking a failure can take many minutes on these pipelines: off unless ONNXPRUNE_FUZZ_SHRINK=1 (the
# failing example's draws and seed are printed either way).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if os.environ.get("ONNXPRUNE_FUZZ_SHRINK") else [])
# make test draws the same examples every run (a red CI run is then reproducible, and main stays green
# unless the code changes); make fuzz explores new ones (ONNXPRUNE_FUZZ_RANDOM=1).
RANDOM = bool(os.environ.get("ONNXPRUNE_FUZZ_RANDOM"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, phases=PHASES, derandomize=not RANDOM,
                database=None if not RANDOM else settings.default.database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(vision_graphs(), st.data())
def test_vision_graphs(proto, data):
    pipeline(proto, data)


@FUZZ
@given(sequence_graphs(), st.data())
def test_sequence_graphs(proto, data):
    pipeline(proto, data)


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 5))
@given(float16_graphs(), st.data())
def test_float16_graphs(proto, data):
    OUTCOMES["float16"] += 1
    pipeline(proto, data)


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 5))
@given(decoder_graphs(), st.data())
def test_decoder_graphs(proto, data):
    """Decoders with a KV cache: every layer found with its cache; removing a drawn layer (through the CLI)
    equals the original with that layer's branches zeroed, on logits and on the kept layers' present cache
    (renumbered contiguous); SR-init per transformer layer and eval --task lm run on token data."""
    from onnxprune import inspect
    from onnxprune.analysis.blocks import transformer_layers

    OUTCOMES["decoder with KV cache"] += 1
    INPUT_SHAPE[:] = []  # the vision graphs' --input-shape names their 'input', not the decoder's
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = d / "model.onnx"
        onnx.save(proto, model)
        layers = transformer_layers(inspect(model).blocks)
        count = len([i for i in proto.graph.input if i.name.endswith(".key")])
        assert len(layers) == count and all(b.removable for members in layers for b in members)
        for i, members in enumerate(layers):
            assert sorted(members[0].cache_inputs) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        drop = data.draw(st.integers(0, count - 1))
        rng = np.random.default_rng(drop)
        ids = rng.integers(0, 11, (4, 3))
        np.savez(d / "tokens.npz", input_ids=ids)
        cli("score", model, "--method", "srinit", "--units", "transformer-layers", "--data", d / "tokens.npz",
            "-o", d / "sr.json", allow_error=False)
        plan = json.loads((d / "sr.json").read_text())
        plan_units = [u for u in plan["units"] if u["name"] == layers[drop][0].name]
        assert plan_units and plan_units[0]["blocks"] == [b.name for b in layers[drop]]
        from onnxprune.artefacts import Plan, write_json

        info = inspect(model)
        write_json(Plan(method="manual", fingerprint=info.fingerprint, layers=[], totals={}, granularity="blocks",
                        blocks=[{"name": b.name, "layers": b.layers} for b in layers[drop]]).to_dict(),
                   d / "plan.json")
        cli("apply", model, d / "plan.json", "-o", d / "pruned.onnx", allow_error=False)
        kv, dh = proto.graph.input[1].type.tensor_type.shape.dim[1].dim_value, 4
        feeds = {"input_ids": ids[:2]}
        for i in range(count):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((2, kv, 2, dh)).astype(np.float32)
        oracle = ort.InferenceSession(zero_branches(model, layers[drop]))
        want = dict(zip([o.name for o in oracle.get_outputs()], oracle.run(None, feeds), strict=True))
        pruned = ort.InferenceSession(str(d / "pruned.onnx"))
        kept = [i for i in range(count) if i != drop]
        mine = {f"past_key_values.{j}.{kind}": feeds[f"past_key_values.{i}.{kind}"]
                for j, i in enumerate(kept) for kind in ("key", "value")}
        got = dict(zip([o.name for o in pruned.get_outputs()], pruned.run(None, {"input_ids": ids[:2], **mine}),
                       strict=True))
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
        for j, i in enumerate(kept):
            np.testing.assert_allclose(got[f"present.{j}.key"], want[f"present.{i}.key"], atol=1e-4, rtol=1e-4)
        assert len(got) == 1 + 2 * len(kept)
        OUTCOMES["decoder layer oracle"] += 1
        result = cli("eval", d / "pruned.onnx", "--data", d / "tokens.npz", allow_error=False)
        assert np.isfinite(result["language_model"]["perplexity"])


def test_fuzz_really_exercised_everything():
    """Runs after the two above (file order): the oracles were reached and most commands succeeded."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz tests")
    print(dict(OUTCOMES), dict(ERRORS))
    for what in ("apply: ok", "channel oracle", "block oracle", "finetune: ok", "eval: ok", "sensitivity",
                 "dynamic height and width", "recurrent layer", "layers in If branches", "float16",
                 "search", "compactness", "decoder layer oracle", "data-aware wanda", "data-aware obs"):
        assert OUTCOMES[what] > 0, (what, dict(OUTCOMES))
    assert OUTCOMES["apply: ok"] > 4 * OUTCOMES["apply: clean error"], dict(OUTCOMES)
