"""Benchmark of issue 18: decoder LLM layer removal, with the KV cache, on held-out text.

The model: models/llama_lm.py "small" (Llama architecture, 8 layers, trained on Debian's fortunes), its
Optimum-named export and ONNX Runtime GenAI's fp32 export. 25 % of the decoder layers (2 of 8) are removed
by each rule, and the held-out perplexity of each result is measured with ``onnxprune eval`` (every
held-out sequence of 128 tokens, fed as a prefill):

- ``srinit``: SR-init per transformer layer (``score --method srinit --units transformer-layers``: next-token
  KL to the dense model when the layer is re-initialised), the least sensitive removed;
- ``influence``: block influence per transformer layer (ShortGPT: 1 - cosine of the residual stream before
  and after the layer), the least influential removed;
- ``last``: the last two layers;
- ``onnxsim``: the onnxsim package's ``apply_transformer_block_pruning`` (ShortGPT-style too). It matches
  pre-norm sub-blocks joined by a bare Add after an RMSNorm / SimplifiedLayerNormalization node and declines
  any sub-block whose values leave it (the attention halves: the shared causal mask, the rotary tables, the
  KV cache), so it removes MLP halves only: on the Optimum export after ONNX Runtime's optimizer fused the
  RMSNorm (skip-layer-norm fusion off) and symbolic shape inference, asked for 2 and for 4 blocks.

Calibration: 64 training sequences (calib.npz) for SR-init and influence.

Second part (``--part channels``): KV groups and MLP width to 30 % fewer FLOPs, perplexity and latency.

    python -m tools.bench_llm [--part layers|channels|all] [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune import api
from onnxprune.artefacts import Plan
from onnxprune.io import load_model
from tools.benchlib import ROOT, machine, publish, today

LLM = ROOT / "build" / "llm"
OUT = ROOT / "build" / "bench" / "llm"
REMOVE = 2
CALIB = 64


def ensure_model() -> None:
    if not (LLM / "train.json").exists():
        from models.llama_lm import build

        build(LLM, "small")


def perplexity(path: Path) -> float:
    return api.evaluate(path, LLM / "heldout.npz", latency=False).language_model.perplexity


def layer_plan(src: Path, method: str | None) -> Plan:
    """Remove REMOVE transformer layers: the least sensitive by ``method`` (srinit / influence), or the last."""
    if method is None:
        am = api.inspect(src)
        from onnxprune.analysis.blocks import transformer_layers

        layers = transformer_layers(am.blocks)[-REMOVE:]
        blocks = [{"name": b.name, "layers": b.layers, "unit": members[0].name} for members in layers
                  for b in members]
        return Plan(method="srinit", fingerprint=am.fingerprint, input_shapes={}, layers=[], blocks=blocks,
                    totals={}, granularity="blocks", options={"rule": "last layers"})
    scores = api.score(src, method=method, units="transformer-layers", data=LLM / "calib.npz", limit=CALIB,
                       batch_size=16)
    return api.allocate(src, method="srinit", scores=scores, remove=REMOVE)


def block_plan(src: Path, method: str, **rule) -> Plan:
    """Remove residual sub-blocks (attention or MLP halves), the least sensitive by ``method``; ``rule``:
    remove=K or target_params=P (allocate's)."""
    scores = api.score(src, method=method, units="blocks", data=LLM / "calib.npz", limit=CALIB, batch_size=16)
    return api.allocate(src, method="srinit", scores=scores, **rule)


def onnxsim_prune(src: Path, dst: Path, blocks: int) -> Path:
    import onnxsim
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_skip_layer_norm = False  # keep the residual Adds bare: onnxsim matches those
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    fused = optimize_model(str(src), model_type="gpt2", num_heads=0, hidden_size=0, optimization_options=options,
                           opt_level=0).model
    shaped = SymbolicShapeInference.infer_shapes(fused, auto_merge=True)
    calib = np.load(LLM / "calib.npz")["input_ids"][:8]
    from onnxprune.runtime.language_model import decoder_of

    decoder = decoder_of(load_model(src))
    batches = [decoder.prefill(calib[i:i + 2]) for i in range(0, 8, 2)]
    pruned = onnxsim.apply_transformer_block_pruning(shaped, calibration_data=batches, num_blocks_to_drop=blocks)
    onnx.save(pruned, str(dst))
    return dst


def params(path: Path) -> int:
    """Float weight matrices the graph's nodes read (a pruner may leave unread initializers behind)."""
    proto = onnx.load(str(path))
    read = {i for n in proto.graph.node for i in n.input}
    return int(sum(np.prod(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                   and len(t.dims) > 1 and t.name in read))


def run() -> dict:
    ensure_model()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for export in ("optimum", "genai_fp32"):
        src = LLM / export / "model.onnx"
        dense = perplexity(src)
        rows.append({"export": export, "rule": "dense", "ppl": dense, "removed": [], "params": params(src),
                     "seconds": 0.0})
        for rule, method in (("srinit", "srinit"), ("influence", "influence"), ("last", None)):
            t0 = time.perf_counter()
            plan = layer_plan(src, method)
            seconds = time.perf_counter() - t0
            folder = OUT / f"{export}_{rule}"
            folder.mkdir(exist_ok=True)
            api.apply(src, plan, folder / "model.onnx", force=True)
            removed = sorted({b.get("unit", b["name"]) for b in plan.blocks})
            rows.append({"export": export, "rule": rule, "ppl": perplexity(folder / "model.onnx"), "removed": removed,
                         "params": params(folder / "model.onnx"), "seconds": round(seconds, 1)})
        if export == "optimum":  # sub-blocks: as many as onnxsim removes, and as many parameters
            dense_params = params(src)
            total = api.inspect(src).params
            kinds = {b.name: f"{_layer_index(b.name)} {'attention' if b.attention else 'MLP'}"
                     for b in api.inspect(src).blocks}
            for blocks in (REMOVE, 2 * REMOVE):
                dst = OUT / f"onnxsim_{blocks}.onnx"
                t0 = time.perf_counter()
                onnxsim_prune(src, dst, blocks)
                seconds = time.perf_counter() - t0
                peer = {"export": export, "rule": f"onnxsim ({blocks} blocks)", "ppl": perplexity(dst),
                        "removed": [], "params": params(dst), "seconds": round(seconds, 1)}
                rows.append(peer)
                fraction = (dense_params - peer["params"]) / total
                for rule in ("srinit", "influence"):
                    for budget, kwargs in ((f"{blocks} blocks", {"remove": blocks}),
                                           (f"params of onnxsim {blocks}", {"target_params": fraction})):
                        t0 = time.perf_counter()
                        plan = block_plan(src, rule, **kwargs)
                        seconds = time.perf_counter() - t0
                        out = OUT / f"{export}_{rule}_{budget.replace(' ', '_')}.onnx"
                        api.apply(src, plan, out, force=True)
                        rows.append({"export": export, "rule": f"{rule} ({budget})", "ppl": perplexity(out),
                                     "removed": [kinds[b["name"]] for b in plan.blocks], "params": params(out),
                                     "seconds": round(seconds, 1)})
    return {"rows": rows, "train": json.loads((LLM / "train.json").read_text())}


def _layer_index(name: str) -> str:
    """A unit's layer number (``/model/layers.3/...`` -> 3); other text as it is."""
    import re

    m = re.match(r".*?layers\.(\d+)/", name)
    return m.group(1) if m else name


def render(result: dict) -> str:
    train = result["train"]
    lines = [
        "## Decoder LLM: 25 % of the layers removed, held-out perplexity (issue 18)",
        "",
        f"Measured {today()} on {machine()}: `python -m tools.bench_llm --write`.",
        "",
        f"Model: models/llama_lm.py `small` (Llama: RMSNorm, rotary, GQA {train['config']['num_attention_heads']}"
        f"/{train['config']['num_key_value_heads']} heads, SwiGLU; {train['config']['num_hidden_layers']} layers, "
        f"hidden {train['config']['hidden_size']}, {train['params']:,} parameters), trained {train['steps']} steps "
        f"({train['train_seconds']:.0f} s on this CPU) on Debian's fortunes (every tenth entry held out). Held-out "
        f"perplexity {train['heldout_perplexity']:.1f} (torch) against {train['unigram_perplexity']:.1f} for a "
        f"unigram model of the training tokens (add-one smoothed). Perplexity below: onnxprune eval over all "
        f"{train['heldout_sequences']} held-out sequences of {train['config']['seq']} tokens. {REMOVE} of 8 "
        f"layers removed by each rule, with their KV cache; calibration: {CALIB} training sequences. "
        "`params`: float weight matrices the graph reads. onnxsim cannot remove a whole layer (it declines every "
        "attention half: the causal mask, rotary tables and KV cache leave the block), so its rows remove MLP "
        "halves; onnxprune's sub-block rules are compared with it at the same number of blocks and at the same "
        "parameters removed (`allocate --method srinit --target-params`, the fraction onnxsim's blocks hold).",
        "",
        "| export | rule | layers removed | held-out perplexity | params | scoring s |",
        "|---|---|---|---:|---:|---:|",
    ]
    def budget(rule: str) -> str:
        """The comparison a row belongs to: whole layers, N blocks, or the parameters onnxsim's N blocks hold."""
        if "(" not in rule:
            return "layers"
        inner = rule.split("(")[1].rstrip(")")
        return inner

    best: dict[tuple, float] = {}
    for r in result["rows"]:
        if r["rule"] != "dense":
            key = (r["export"], budget(r["rule"]))
            best[key] = min(best.get(key, float("inf")), r["ppl"])
    for r in result["rows"]:
        ppl = f"{r['ppl']:.2f}"
        if r["rule"] != "dense" and r["ppl"] == best[(r["export"], budget(r["rule"]))]:
            ppl = f"**{ppl}**"
        removed = ", ".join(_layer_index(n) for n in r["removed"]) or ("-" if r["rule"] == "dense" else "MLP halves")
        lines.append(f"| {r['export']} | {r['rule']} | {removed} | {ppl} | {r['params']:,} | {r['seconds']:.1f} |")
    rows = [r for r in result["rows"] if r["export"] == "optimum"]
    lines.append("")
    for key in sorted({budget(r["rule"]) for r in rows if r["rule"] != "dense"}):
        group = [r for r in rows if r["rule"] != "dense" and budget(r["rule"]) == key]
        ours = [r for r in group if r["rule"].split()[0] in ("srinit", "influence")]
        peers = [r for r in group if r not in ours]
        if key.startswith("params of onnxsim"):  # the same parameters as onnxsim's N blocks removed
            n = key.split()[-1]
            peers = [r for r in rows if r["rule"] == f"onnxsim ({n} blocks)"]
        if not ours or not peers:
            continue
        top = min(r["ppl"] for r in ours)
        met = all(top <= r["ppl"] for r in peers)
        what = (f"{REMOVE} whole layers" if key == "layers" else f"sub-blocks, {key}" if key.startswith("params")
                else f"{key} (sub-blocks)")
        mine = min(ours, key=lambda r: r["ppl"])
        lines.append(f"- {what}, Optimum export: onnxprune's best {top:.2f} ({mine['params']:,} params left) against "
                     + ", ".join(f"{r['rule']} {r['ppl']:.2f} ({r['params']:,})" for r in peers)
                     + f": target (at or below every baseline) **{'met' if met else 'missed'}**.")
    return "\n".join(lines) + "\n"


def render_channels(result: dict) -> str:
    small, wide = result["small"], result["wide"]
    cut_small = small["flops_before"] / small["flops_after"]
    cut_wide = wide["flops_before"] / wide["flops_after"]
    prefill = wide["prefill_dense"] / wide["prefill_pruned"]
    decode = wide["decode_dense"] / wide["decode_pruned"]
    lines = [
        "## Decoder LLM: KV groups and MLP width to 30 % fewer FLOPs (issue 18)",
        "",
        f"Measured {today()} on {machine()}: `python -m tools.bench_llm --part channels --write`.",
        "",
        "`allocate --method uniform --granularity channel --budget flops --target-sparsity 0.3` (default "
        "rounding) on ONNX Runtime GenAI's fp32 export, FLOPs counted at batch 1 and the sequence length given "
        "(`--dim`), then `apply`: whole KV groups of GroupQueryAttention (a key head, a value head and their "
        "query heads; the cache inputs and genai_config.json follow) and the SwiGLU width (gate, up and down "
        "together). Perplexity: the trained `small` model on all held-out sequences. Latency: a `wide` "
        "configuration of the same architecture (hidden 1024, 16/4 heads, MLP 2816, 8 layers, untrained: speed "
        "does not depend on the weights), ONNX Runtime CPU, batch 1, median of interleaved rounds.",
        "",
        "| model | heads (q/kv) | FLOPs dense -> pruned | FLOP ratio | perplexity dense -> pruned |",
        "|---|---|---|---:|---|",
        f"| small (seq 128) | {small['heads_dense'][0]}/{small['heads_dense'][1]} -> {small['heads'][0]}/"
        f"{small['heads'][1]} | {small['flops_before'] / 1e6:.1f}M -> {small['flops_after'] / 1e6:.1f}M | "
        f"{cut_small:.2f}x | {small['ppl_dense']:.2f} -> {small['ppl_pruned']:.2f} |",
        f"| wide (seq 256) | {wide['heads_dense'][0]}/{wide['heads_dense'][1]} -> {wide['heads'][0]}/"
        f"{wide['heads'][1]} | {wide['flops_before'] / 1e9:.2f}G -> {wide['flops_after'] / 1e9:.2f}G | "
        f"{cut_wide:.2f}x | - |",
        "",
        "| wide, batch 1 | dense ms | pruned ms | speed-up | speed-up / FLOP ratio |",
        "|---|---:|---:|---:|---:|",
        f"| prefill of {wide['seq']} tokens | {wide['prefill_dense']:.1f} | {wide['prefill_pruned']:.1f} | "
        f"{prefill:.2f}x | {prefill / cut_wide:.2f} |",
        f"| decode 1 token at context {wide['seq']} | {wide['decode_dense']:.2f} | {wide['decode_pruned']:.2f} | "
        f"{decode:.2f}x | {decode / cut_wide:.2f} |",
        "",
        f"Target (prefill speed-up at least 0.8 of the FLOP reduction): **{'met' if prefill / cut_wide >= 0.8 else 'missed'}** "
        f"({prefill / cut_wide:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("layers", "channels", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the llm sections of BENCHMARKS.md")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part in ("layers", "all"):
        result = run()
        publish(result, OUT / "layers.json", render(result), "llm-layers", args.write)
    if args.part in ("channels", "all"):
        result = channel_rows(args.rounds)
        publish(result, OUT / "channels.json", render_channels(result), "llm-channels", args.write)




WIDE = ROOT / "build" / "llm_wide"
TARGET = 0.3


def _dims(seq: int) -> list[str]:
    return ["batch_size=1", f"sequence_length={seq}", "past_sequence_length=0", f"total_sequence_length={seq}"]


def channel_rows(rounds: int) -> dict:
    """KV groups and MLP width to 30 % fewer FLOPs (uniform plan): held-out perplexity on the trained model
    (GenAI fp32), ONNX Runtime latency dense vs pruned on the wide untrained one (prefill of 256 tokens,
    one decode step at a context of 256), interleaved."""
    from onnxprune.runtime.timing import lm_latency

    ensure_model()
    if not (WIDE / "genai_fp32" / "model.onnx").exists():
        from models.llama_lm import build

        build(WIDE, "wide", steps=0, int4=False, optimum=False)
    out = {}
    for name, folder, seq in (("small", LLM, 128), ("wide", WIDE, 256)):
        src = folder / "genai_fp32" / "model.onnx"
        dims = _dims(seq) + [f"kv_cache_dim={_head_size(src)}"]
        plan = api.allocate(src, method="uniform", granularity="channel", budget="flops", target_sparsity=TARGET,
                            input_shapes=dims)
        dst = OUT / f"{name}_channels" / "model.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        res = api.apply(src, plan, dst, force=True)
        heads = json.loads((dst.parent / "genai_config.json").read_text())["model"]["decoder"]
        dense = json.loads((src.parent / "genai_config.json").read_text())["model"]["decoder"]
        row = {"heads_dense": [dense["num_attention_heads"], dense["num_key_value_heads"]],"flops_before": res.totals["flops_before"], "flops_after": res.totals["flops_after"],
               "heads": [heads["num_attention_heads"], heads["num_key_value_heads"]], "seq": seq,
               "round_to": plan.options.get("round_to")}
        if name == "small":
            row["ppl_dense"], row["ppl_pruned"] = perplexity(src), perplexity(dst)
        else:
            (pd, dd), (pp, dp) = lm_latency([src, dst], "cpu", context=seq, rounds=rounds)
            row.update(prefill_dense=pd, prefill_pruned=pp, decode_dense=dd, decode_pruned=dp)
        out[name] = row
    return out


def _head_size(src: Path) -> int:
    from onnxprune.runtime.language_model import decoder_of

    return next(iter(decoder_of(load_model(src)).past.values()))[3]


if __name__ == "__main__":
    main()
