"""Benchmark of issue 19: data-aware one-shot pruning inside each layer on ResNet-56 (CIFAR-10).

Per-layer sparsities from LAMP (and from ``search`` at the sparsities in ``--search``: its objective stays
magnitude), then each layer's zeros chosen by ``magnitude``, ``wanda`` or ``obs`` (SparseGPT) from the
layers' inputs on calibration images (JPEG images 1017.., ``--calib`` of them, the first size for wanda
and obs, the others for obs: never the lossless 1,017 test images); and at 2:4 (every layer). Peers in the same run: onnxsim 0.8.1's magnitude and Wanda
(uniform and global, the same calibration images) and SparseGPT (MatMul/Gemm only in onnxsim: on ResNet-56
it prunes the classifier). Test: lossless 1,017 and the JPEG 10k set (``--jpeg-limit`` to shorten). The
wall time of each apply is reported.

Second part (``--part llm``): the decoder LLM of issue 18 (models/llama_lm.py "small", its Optimum export),
every layer at 50 % and at 2:4 (the LM head too), held-out perplexity of each criterion against onnxsim's
magnitude, Wanda and SparseGPT on the same graph and the same 64 training sequences.

    python -m tools.bench_data_aware [--part resnet|llm|all] [--sparsities 0.6,0.7,0.8] [--calib 128,512]
                                     [--search 0.7] [--write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import onnx

from onnxprune import api
from tools.benchlib import ROOT, bench_resnet56, machine, publish, today

OUT = ROOT / "build" / "bench" / "data_aware"
OFFSET = 1017


def cifar(kind: str) -> Path:
    from models.paths import cifar_data

    return cifar_data(kind)


def evaluate(path: Path, jpeg_limit: int | None) -> dict:
    return {"lossless": api.evaluate(path, cifar("lossless"), batch_size=512).top1,
            "jpeg": api.evaluate(path, cifar("jpeg"), batch_size=512, limit=jpeg_limit).top1}


def calibration(src: Path, count: int, data: Path | None = None, offset: int = OFFSET, batch: int | None = None
                ) -> list[dict]:
    """The calibration samples as onnxsim takes them (whole feeds, prepared as onnxprune feeds them: images
    normalised; a decoder's token ids with their attention mask, positions and empty KV cache)."""
    from onnxprune.io import load_model
    from onnxprune.runtime import data as rdata
    from onnxprune.runtime.feeding import batches
    from onnxprune.runtime.session import create_session

    spec = rdata.DataSpec.of(data or cifar("jpeg"), offset=offset, limit=count, batch_size=batch or count)
    feeds, _, _ = batches(load_model(src), create_session(src, "cpu"), spec)
    return [f for f, _ in feeds]


def run(sparsities: list[float], calibs: list[int], search: list[float], jpeg_limit: int | None) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    src = bench_resnet56()
    rows = [{"setting": "dense", "allocation": "-", "criterion": "-", **evaluate(src, jpeg_limit), "seconds": 0.0}]
    peers = calibration(src, calibs[0])
    settings = [("magnitude", None), *((c, calibs[0]) for c in ("wanda", "obs")), *(("obs", n) for n in calibs[1:])]
    for target in [*sparsities, "2:4"]:
        allocations = ["lamp"] + (["search"] if target in search else [])
        for allocation in allocations:
            if target == "2:4":
                plan = api.allocate(src, method="uniform", target_sparsity=0.5)
            elif allocation == "search":
                plan = api.allocate(src, method="search", target_sparsity=target, data=cifar("jpeg"), offset=OFFSET,
                                    limit=512, iterations=150)
            else:
                plan = api.allocate(src, method="lamp", target_sparsity=target)
            for criterion, calib in settings:
                out = OUT / f"{allocation}_{target}_{criterion}_{calib}.onnx".replace(":", "of")
                t0 = time.perf_counter()
                api.apply(src, plan, out, force=True, criterion=criterion,
                          granularity="n:m" if target == "2:4" else None,
                          **({"data": cifar("jpeg"), "offset": OFFSET, "limit": calib} if calib else {}))
                seconds = time.perf_counter() - t0
                rows.append({"setting": str(target), "allocation": "every layer" if target == "2:4" else allocation,
                             "criterion": criterion if calib is None else f"{criterion} ({calib})",
                             **evaluate(out, jpeg_limit), "seconds": round(seconds, 1)})
        for name, prune in _onnxsim(src, target, peers).items():
            out = OUT / f"onnxsim_{name}_{target}.onnx".replace(":", "of")
            t0 = time.perf_counter()
            onnx.save(prune(), str(out))
            seconds = time.perf_counter() - t0
            rows.append({"setting": str(target), "allocation": "onnxsim", "criterion": name,
                         **evaluate(out, jpeg_limit), "seconds": round(seconds, 1)})
    return {"rows": rows, "calib": calibs, "jpeg_limit": jpeg_limit}


def _onnxsim(src: Path, target, peers: list[dict]) -> dict:
    import onnxsim

    nm = {"n": 2, "m": 4} if target == "2:4" else {}
    sparsity = 0.5 if target == "2:4" else float(target)
    out = {"magnitude": lambda: onnxsim.apply_magnitude_pruning(str(src), sparsity=sparsity, **nm),
           "wanda": lambda: onnxsim.apply_wanda_pruning(str(src), calibration_data=peers, sparsity=sparsity, **nm)}
    if not nm:
        out["magnitude (global)"] = lambda: onnxsim.apply_magnitude_pruning(str(src), sparsity=sparsity,
                                                                            global_sparsity=True)
        out["wanda (global)"] = lambda: onnxsim.apply_wanda_pruning(str(src), calibration_data=peers,
                                                                    sparsity=sparsity, global_sparsity=True)
    return out


def run_llm(calib: int = 64) -> dict:
    """Every layer of the decoder at 50 % and 2:4 by each criterion, and onnxsim's three, perplexity each."""
    import onnxsim

    from tools.bench_llm import LLM, ensure_model, perplexity

    ensure_model()
    src = LLM / "optimum" / "model.onnx"
    out = OUT / "llm"
    out.mkdir(parents=True, exist_ok=True)
    data = {"data": LLM / "calib.npz", "limit": calib, "batch_size": 8}
    peers = calibration(src, calib, LLM / "calib.npz", offset=0, batch=8)
    rows = [{"setting": "dense", "who": "-", "criterion": "-", "ppl": perplexity(src), "seconds": 0.0}]
    plan = api.allocate(src, method="uniform", target_sparsity=0.5)
    for setting, nm in (("50 %", {}), ("2:4", {"n": 2, "m": 4})):
        for criterion in ("magnitude", "wanda", "obs"):
            dst = out / f"onnxprune_{criterion}_{'nm' if nm else 'u'}.onnx"
            t0 = time.perf_counter()
            api.apply(src, plan, dst, force=True, criterion=criterion, granularity="n:m" if nm else None,
                      **(data if criterion != "magnitude" else {}))
            rows.append({"setting": setting, "who": "onnxprune", "criterion": criterion, "ppl": perplexity(dst),
                         "seconds": round(time.perf_counter() - t0, 1)})
        for name, fn in (("magnitude", lambda: onnxsim.apply_magnitude_pruning(str(src), sparsity=0.5, **nm)),
                         ("wanda", lambda: onnxsim.apply_wanda_pruning(str(src), calibration_data=peers,
                                                                       num_samples=len(peers), sparsity=0.5, **nm)),
                         ("sparsegpt", lambda: onnxsim.apply_sparsegpt_pruning(
                             str(src), calibration_data=peers, num_samples=len(peers), sparsity=0.5, **nm))):
            dst = out / f"onnxsim_{name}_{'nm' if nm else 'u'}.onnx"
            t0 = time.perf_counter()
            try:
                onnx.save(fn(), str(dst))
                ppl = perplexity(dst)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result too
                ppl = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append({"setting": setting, "who": "onnxsim", "criterion": name, "ppl": ppl,
                         "seconds": round(time.perf_counter() - t0, 1)})
    return {"rows": rows, "calib": calib}


def render_llm(result: dict) -> str:
    lines = [
        "## Data-aware one-shot pruning: decoder LLM (issue 19)",
        "",
        f"Measured {today()} on {machine()}: `python -m tools.bench_data_aware --part llm --write`.",
        "",
        "The Llama-architecture decoder of issue 18 (models/llama_lm.py \"small\", 8 layers, trained on Debian's "
        "fortunes; its Optimum export with KV cache), every MatMul layer (the LM head too) at 50 % and at 2:4 "
        f"(N of M along the inputs). Calibration: {result['calib']} training sequences of 128 tokens, the same "
        "feeds for onnxsim 0.8.1 in the same run. Held-out perplexity (every held-out sequence, as a prefill; lower "
        "is better), wall seconds of the pruning call.",
        "",
        "| setting | pruner | criterion | held-out perplexity | s |",
        "|---|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        ppl = r["ppl"] if isinstance(r["ppl"], str) else f"{r['ppl']:.2f}"
        lines.append(f"| {r['setting']} | {r['who']} | {r['criterion']} | {ppl} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def render(result: dict) -> str:
    rows = result["rows"]
    jpeg = "JPEG 10k" if result["jpeg_limit"] is None else f"JPEG first {result['jpeg_limit']:,}"
    lines = [
        "## Data-aware one-shot pruning: ResNet-56 (issue 19)",
        "",
        f"Measured {today()} on {machine()}: `python -m tools.bench_data_aware --write`.",
        "",
        "Per-layer sparsities from LAMP (or `search`, its objective magnitude), each layer's zeros chosen by "
        "magnitude, `wanda` or `obs` (SparseGPT against the original model's layer outputs, bias refit) on N "
        "calibration images (the criterion's `(N)`; JPEG 1017..; never the lossless test images), no "
        "fine-tuning. 2:4: every layer (the classifier too), N of M along the input channels. onnxsim 0.8.1 in "
        f"the same run on the first {result['calib'][0]} images (its SparseGPT covers MatMul / Gemm only, so on "
        "a CNN it is not a peer). Top-1 %, wall seconds of the pruning call (evaluation not included).",
        "",
        f"| sparsity | allocation | criterion | lossless 1,017 | {jpeg} | s |",
        "|---|---|---|---:|---:|---:|",
    ]
    best = {}
    for r in rows:
        best[r["setting"]] = max(best.get(r["setting"], -1.0), r["jpeg"])
    for r in rows:
        jp = f"{r['jpeg']:.2f}"
        if r["setting"] != "dense" and r["jpeg"] == best[r["setting"]]:
            jp = f"**{jp}**"
        lines.append(f"| {r['setting']} | {r['allocation']} | {r['criterion']} | {r['lossless']:.2f} | {jp} | "
                     f"{r['seconds']:.1f} |")
    dense = rows[0]
    at70 = [r for r in rows if r["setting"] == "0.7" and r["allocation"] != "onnxsim"]
    at24 = [r for r in rows if r["setting"] == "2:4" and r["allocation"] != "onnxsim"]
    lines.append("")
    if at70:
        top = max(at70, key=lambda r: r["jpeg"])
        lines.append(f"- 70 %: best {top['allocation']} + {top['criterion']}: {top['jpeg']:.2f} JPEG (target 78: "
                     f"**{'met' if top['jpeg'] >= 78 else 'missed'}**), {top['lossless']:.2f} lossless (target 90: "
                     f"**{'met' if top['lossless'] >= 90 else 'missed'}**).")
    if at24:
        top = max(at24, key=lambda r: r["lossless"])
        gap = dense["lossless"] - top["lossless"]
        side = f"{gap:.2f} points below" if gap >= 0 else f"{-gap:.2f} points above"
        lines.append(f"- 2:4: best {top['criterion']} {top['lossless']:.2f} lossless, {side} dense "
                     f"(target within 3: **{'met' if gap <= 3 else 'missed'}**).")
    by = {(r["setting"], r["allocation"], r["criterion"]): r for r in rows}
    sizes = result["calib"]
    if len(sizes) > 1:
        pairs = [(by[k[:2] + (f"obs ({sizes[0]})",)], r) for k, r in by.items() if k[2] == f"obs ({sizes[-1]})"
                 and k[:2] + (f"obs ({sizes[0]})",) in by]
        if pairs:
            gain = sum(b["jpeg"] - a["jpeg"] for a, b in pairs) / len(pairs)
            cost = sum(b["seconds"] for _, b in pairs) / max(sum(a["seconds"] for a, _ in pairs), 1e-9)
            lines.append(f"- obs on {sizes[-1]} images instead of {sizes[0]}: {gain:+.2f} JPEG points on average over "
                         f"{len(pairs)} settings, {cost:.1f}x the time; {sizes[0]} is the default.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.6,0.7,0.8")
    parser.add_argument("--calib", default="128,512", help="calibration sizes: the first for wanda and obs, the "
                                                           "others for obs")
    parser.add_argument("--search", default="0.7", help="sparsities also allocated by search (minutes each); "
                                                        "'' for none")
    parser.add_argument("--jpeg-limit", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="replace the data-aware section of BENCHMARKS.md")
    parser.add_argument("--part", choices=("resnet", "llm", "all"), default="resnet")
    args = parser.parse_args()
    if args.part in ("resnet", "all"):
        result = run([float(s) for s in args.sparsities.split(",")], [int(c) for c in args.calib.split(",")],
                     [float(s) for s in args.search.split(",") if s], args.jpeg_limit)
        publish(result, OUT / "result.json", render(result), "data-aware", args.write)
    if args.part in ("llm", "all"):
        result = run_llm()
        publish(result, OUT / "llm_result.json", render_llm(result), "data-aware-llm", args.write)


if __name__ == "__main__":
    main()
