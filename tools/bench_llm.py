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

    python -m tools.bench_llm [--write]
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
from tools.benchlib import ROOT, machine, today, write_section

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


def layer_plan(src: Path, method: str | None, units: str = "transformer-layers", remove: int = REMOVE) -> Plan:
    """Remove ``remove`` transformer layers (or blocks): the least sensitive by ``method`` (srinit /
    influence), or the last layers."""
    if method is None:
        am = api.inspect(src)
        from onnxprune.analysis.blocks import transformer_layers

        layers = transformer_layers(am.blocks)[-remove:]
        blocks = [{"name": b.name, "layers": b.layers, "unit": members[0].name} for members in layers
                  for b in members]
        return Plan(method="srinit", fingerprint=am.fingerprint, input_shapes={}, layers=[], blocks=blocks,
                    totals={}, granularity="blocks", options={"rule": "last layers"})
    scores = api.score(src, method=method, units=units, data=LLM / "calib.npz", limit=CALIB, batch_size=16)
    return api.allocate(src, method="srinit", scores=scores, remove=remove)


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
        if export == "optimum":  # sub-blocks, as many as onnxsim removes
            for blocks in (REMOVE, 2 * REMOVE):
                for rule in ("srinit", "influence"):
                    t0 = time.perf_counter()
                    plan = layer_plan(src, rule, units="blocks", remove=blocks)
                    seconds = time.perf_counter() - t0
                    out = OUT / f"{export}_{rule}_blocks{blocks}.onnx"
                    api.apply(src, plan, out, force=True)
                    kinds = {b.name: f"{_layer_index(b.name)} {'attention' if b.attention else 'MLP'}"
                             for b in api.inspect(src).blocks}
                    rows.append({"export": export, "rule": f"{rule} ({blocks} blocks)", "ppl": perplexity(out),
                                 "removed": [kinds[b["name"]] for b in plan.blocks], "params": params(out),
                                 "seconds": round(seconds, 1)})
            for blocks in (REMOVE, 2 * REMOVE):
                dst = OUT / f"onnxsim_{blocks}.onnx"
                t0 = time.perf_counter()
                onnxsim_prune(src, dst, blocks)
                seconds = time.perf_counter() - t0
                rows.append({"export": export, "rule": f"onnxsim ({blocks} blocks)", "ppl": perplexity(dst),
                             "removed": [], "params": params(dst), "seconds": round(seconds, 1)})
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
        "`params`: float weight matrices left. onnxsim cannot remove a whole layer (it declines every attention "
        "half: the causal mask, rotary tables and KV cache leave the block), so its rows remove MLP halves.",
        "",
        "| export | rule | layers removed | held-out perplexity | params | scoring s |",
        "|---|---|---|---:|---:|---:|",
    ]
    def budget(rule: str) -> str:
        return rule.split("(")[1].rstrip(")") if "(" in rule else "layers"

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
        if not ours or not peers:
            continue
        top = min(r["ppl"] for r in ours)
        met = all(top <= r["ppl"] for r in peers)
        what = f"{REMOVE} whole layers" if key == "layers" else key + " (sub-blocks)"
        lines.append(f"- {what}, Optimum export: onnxprune's best {top:.2f} against "
                     + ", ".join(f"{r['rule']} {r['ppl']:.2f}" for r in peers)
                     + f": target (at or below every baseline) **{'met' if met else 'missed'}**.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the llm-layers section of BENCHMARKS.md")
    args = parser.parse_args()
    result = run()
    (OUT / "result.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    print(text)
    if args.write:
        write_section("llm-layers", text)


if __name__ == "__main__":
    main()
