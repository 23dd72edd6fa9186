"""Decoder LLMs as deployed: a Llama-architecture model trained for seconds on Debian's fortunes text
(models/llama_lm.py, "tiny"), exported by ONNX Runtime GenAI's builder (fp32 and int4: GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits) and with Optimum's names by torch. Whole decoder layers go
with their KV cache; the pruned GenAI folder still generates with onnxruntime_genai."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune import api
from onnxprune.cli import main
from onnxprune.io import load_model
from onnxprune.runtime.language_model import decoder_of

pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

if not Path("/usr/share/games/fortunes").is_dir():
    pytest.skip("Debian's fortunes package is not installed (apt-get install fortunes)", allow_module_level=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    from models.llama_lm import build

    out = tmp_path_factory.mktemp("llm")
    build(out, "tiny", steps=40, log=lambda *_: None)
    return out


def run_cli(args: list[str], expect: int = 0) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.stderr, result.exception)
    return result.exit_code, result.stderr + result.stdout


def generate(folder: Path, prompt: list[int], new: int = 12) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def io_names(path: Path) -> tuple[list[str], list[str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]


def prune_layers(model: Path, scores: Path, out: Path, remove: int, tmp: Path) -> Path:
    plan = tmp / f"plan{remove}.json"
    run_cli(["allocate", str(model), "--method", "srinit", "--scores", str(scores), "--remove", str(remove),
             "-o", str(plan)])
    out.mkdir(parents=True, exist_ok=True)
    run_cli(["apply", str(model), str(plan), "-o", str(out / "model.onnx")])
    return out / "model.onnx"


@pytest.mark.parametrize("export", ["genai_fp32", "optimum"])
def test_decoder_layers_are_found_with_their_cache(llm, export):
    model = load_model(llm / export / "model.onnx")
    am = api.inspect(model)
    blocks = am.blocks
    assert len(blocks) == 8 and all(b.removable for b in blocks)  # attention and MLP of 4 layers
    attention = [b for b in blocks if b.attention]
    assert len(attention) == 4
    for i, block in enumerate(attention):
        assert sorted(block.cache_inputs) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert sorted(block.cache_outputs) == [f"present.{i}.key", f"present.{i}.value"]
    decoder = decoder_of(model)
    assert decoder is not None and decoder.layers == 4 and decoder.vocab == 384
    assert all(shape[3] == 16 for shape in decoder.past.values())  # GenAI's symbolic kv_cache_dim read from GQA


def test_genai_and_optimum_exports_agree_on_perplexity(llm):
    ppl = {}
    for export in ("genai_fp32", "optimum", "genai_int4"):
        result = api.evaluate(llm / export / "model.onnx", llm / "heldout.npz", limit=64, latency=False)
        ppl[export] = result.language_model.perplexity
        assert result.language_model.tokens == 64 * 63
    assert ppl["genai_fp32"] == pytest.approx(ppl["optimum"], rel=1e-5)
    assert ppl["genai_int4"] == pytest.approx(ppl["genai_fp32"], rel=0.05)  # int4 weights: close, not equal
    report = json.loads((llm / "train.json").read_text())
    assert report["heldout_perplexity"] < report["unigram_perplexity"]


def test_removing_zero_layers_generates_the_same_tokens(llm, tmp_path):
    src = llm / "genai_fp32" / "model.onnx"
    scores = tmp_path / "scores.json"
    run_cli(["score", str(src), "--method", "influence", "--units", "transformer-layers",
             "--data", str(llm / "calib.npz"), "--limit", "16", "-o", str(scores)])
    same = prune_layers(src, scores, tmp_path / "none", 0, tmp_path)
    prompt = [5, 17, 42, 99, 3]
    assert generate(same.parent, prompt) == generate(src.parent, prompt)


@pytest.mark.parametrize("export", ["genai_fp32", "genai_int4"])
def test_pruned_genai_folder_generates(llm, tmp_path, export):
    src = llm / export / "model.onnx"
    scores = tmp_path / "scores.json"
    run_cli(["score", str(src), "--method", "srinit", "--units", "transformer-layers",
             "--data", str(llm / "calib.npz"), "--limit", "16", "-o", str(scores)])
    units = json.loads(scores.read_text())["units"]
    assert len(units) == 4 and all(u["kind"] == "transformer-layer" and len(u["blocks"]) == 2 for u in units)
    assert all(u["drop"] > 0 for u in units)  # KL of next-token distributions: every layer matters a little
    pruned = prune_layers(src, scores, tmp_path / "pruned", 1, tmp_path)
    config = json.loads((pruned.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 3
    inputs, outputs = io_names(pruned)
    assert [n for n in inputs if n.startswith("past")] == [f"past_key_values.{i}.{kv}" for kv in ("key", "value")
                                                           for i in range(3)]
    assert sorted(n for n in outputs if n.startswith("present")) == sorted(
        f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value"))
    tokens = generate(pruned.parent, [5, 17, 42, 99, 3], new=10)
    assert len(tokens) == 15
    original = json.loads((src.parent / "genai_config.json").read_text())
    assert original["model"]["decoder"]["num_hidden_layers"] == 4  # the input folder untouched
    before = api.evaluate(src, llm / "heldout.npz", limit=32, latency=False).language_model.perplexity
    after = api.evaluate(pruned, llm / "heldout.npz", limit=32, latency=False).language_model.perplexity
    # the layer SR-init finds least sensitive: the model changed, and stays close (trained for seconds only)
    assert after != before and after < 1.5 * before


def test_optimum_layer_zero_goes_with_its_cache(llm, tmp_path):
    """Layer 0's past key is also read for its shape (the causal mask's past length): that reader gets layer
    1's past instead, and the names stay contiguous for a runtime that builds them from a template."""
    src = llm / "optimum" / "model.onnx"
    am = api.inspect(src)
    first = [b for b in am.blocks][:2]  # layer 0: attention, MLP
    plan = api.Plan(method="srinit", fingerprint=am.fingerprint, input_shapes={}, layers=[],
                    blocks=[{"name": b.name, "layers": b.layers} for b in first], totals={}, granularity="blocks",
                    options={})
    out = tmp_path / "opt"
    out.mkdir()
    api.apply(src, plan, out / "model.onnx")
    inputs, outputs = io_names(out / "model.onnx")
    assert [n for n in inputs if n.startswith("past")] == [f"past_key_values.{i}.{kv}" for i in range(3)
                                                           for kv in ("key", "value")]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    result = api.evaluate(out / "model.onnx", llm / "heldout.npz", limit=16, latency=False)
    assert np.isfinite(result.language_model.perplexity)


def test_lm_eval_on_a_model_that_is_not_one_is_refused(tmp_path, export):
    cnn = export("cnn")
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=np.zeros((2, 8), np.int64))
    code, text = run_cli(["eval", str(cnn), "--data", str(data), "--task", "lm"], expect=2)
    assert "not a decoder language model" in text and "Traceback" not in text


def test_token_data_outside_the_vocabulary_is_refused(llm, tmp_path):
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=np.full((2, 8), 5000, np.int64))
    code, text = run_cli(["eval", str(llm / "genai_fp32" / "model.onnx"), "--data", str(data)], expect=2)
    assert "outside the model's vocabulary of 384" in text


DIMS = ["--dim", "batch_size=1", "--dim", "sequence_length=64", "--dim", "past_sequence_length=0",
        "--dim", "total_sequence_length=64", "--dim", "kv_cache_dim=16"]


def half_the_channels(src: Path, tmp_path: Path, apply: bool = True) -> Path:
    """A uniform channel plan at half the FLOPs (KV groups and MLP width), applied into tmp_path/pruned
    (returns that folder), or only planned (returns the plan)."""
    plan = tmp_path / "plan.json"
    run_cli(["allocate", str(src), "--method", "uniform", "--granularity", "channel", "--budget", "flops",
             "--target-sparsity", "0.5", "--round-to", "1", *DIMS, "-o", str(plan)])
    if not apply:
        return plan
    out = tmp_path / "pruned"
    out.mkdir()
    run_cli(["apply", str(src), str(plan), "-o", str(out / "model.onnx")])
    return out


def test_kv_groups_and_mlp_width_go_and_the_folder_still_generates(llm, tmp_path):
    """GroupQueryAttention's KV groups (a key head, a value head, their query heads) and the SwiGLU width are
    channel groups; removing half of each rewrites the heads, the cache's declared head axis and
    genai_config.json, and onnxruntime_genai still generates."""
    src = llm / "genai_fp32" / "model.onnx"
    groups = {tuple(g["layers"]): g for g in api.inspect(src).groups}
    assert groups[("/model/layers.0/attn/qkv_proj/MatMul",)]["channels"] == 2  # 2 KV groups
    assert groups[("/model/layers.0/attn/qkv_proj/MatMul",)]["prunable"]
    assert groups[("/model/layers.0/mlp/gate_proj/MatMul", "/model/layers.0/mlp/up_proj/MatMul")]["prunable"]
    out = half_the_channels(src, tmp_path)
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 1)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    past = next(v for v in proto.graph.input if v.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[1].dim_value == 1
    assert len(generate(out, [5, 17, 42, 99, 3], new=8)) == 13
    result = api.evaluate(out / "model.onnx", llm / "heldout.npz", limit=16, latency=False)
    assert np.isfinite(result.language_model.perplexity)


def test_genai_refuses_layers_with_different_kv_head_counts(llm, tmp_path):
    src = llm / "genai_fp32" / "model.onnx"
    plan = half_the_channels(src, tmp_path, apply=False)
    d = json.loads(plan.read_text())
    for group in d["options"]["group_removed"]:  # layer 0 keeps both KV groups, the others keep one
        if group["layers"] == ["/model/layers.0/attn/qkv_proj/MatMul"]:
            group["removed"] = 0
    plan.write_text(json.dumps(d))
    out = tmp_path / "pruned"
    out.mkdir()
    _, text = run_cli(["apply", str(src), str(plan), "-o", str(out / "model.onnx")], expect=2)
    assert "one KV-head count for every layer" in text
    assert list(out.iterdir()) == []  # nothing written


def test_int4_channels_go_in_quantisation_blocks(llm, tmp_path):
    """MatMulNBits (int4, blocks of 32 along the input): removed output channels leave the kept columns'
    quantised values untouched; an input axis cut inside blocks re-quantises the kept rows, within half a
    quantisation step of the dequantised originals."""
    from onnxprune.tensors.nbits import dequantize, is_nbits, nbits_weight

    src = llm / "genai_int4" / "model.onnx"
    out = half_the_channels(src, tmp_path)
    before = {n.name: n for n in load_model(src).graph if is_nbits(n)}
    after = {n.name: n for n in load_model(out / "model.onnx").graph if is_nbits(n)}
    gate = "/model/layers.0/mlp/gate_proj/MatMul_Q4"
    w0, w1 = dequantize(before[gate]), dequantize(after[gate])
    assert w1.shape == (64, 48)
    columns = {w0[:, j].tobytes() for j in range(w0.shape[1])}
    assert all(w1[:, j].tobytes() in columns for j in range(w1.shape[1]))  # kept columns exactly as they were
    down = "/model/layers.0/mlp/down_proj/MatMul_Q4"
    d0, d1 = dequantize(before[down]), dequantize(after[down])
    assert d1.shape == (48, 64)
    step = float(nbits_weight(after[down]).scales.max())
    nearest = np.abs(d1[:, None, :] - d0[None, :, :]).max(axis=2).min(axis=1)  # each kept row vs the original's
    assert nearest.max() <= step / 2 + 1e-6
    assert len(generate(out, [5, 17, 42, 99, 3], new=6)) == 11
