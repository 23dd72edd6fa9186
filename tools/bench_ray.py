"""Benchmark of issue 20: the Ray backend's overhead on this machine (a cluster here cannot be faster), and
the per-task costs that the README's scale-out estimates are made of.

Overhead: SR-init on ResNet-56 (27 blocks, ``--images`` JPEG images from 1017 on) and a sweep of ResNet-56
(uniform / lamp / capacity at 50 / 70 / 90 %, the 1,017 lossless images), each run locally and on a local
Ray cluster of this machine's CPUs, interleaved (local, ray, ray, local, ...) for ``--rounds`` rounds; the
cluster's start-up is measured once, apart. Every Ray result is checked equal to the local one. Target:
Ray wall time at most 1.3x the local path's.

Costs (one thread, as a task with one CPU runs): for ResNet-56 and the small decoder (issue 18, 64
sequences of 128 tokens), a task's set-up (model rebuilt from the shipped bytes, fresh weights drawn,
sessions made), one pass of the whole model over the data, and the whole SR-init as one task, so that the
passes SR-init costs are measured against the ones its layout predicts (1 + the suffixes' FLOP
fractions); the set-up of a 2.25 GiB external-data model (tools.bench_bigmodel's); Ray's cost per task and
its object store's put / get rate on this node; the per-token cost of the language-model metrics at a
32k vocabulary.

    python -m tools.bench_ray [--images 2000] [--rounds 3] [--part overhead|costs|all] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from onnxprune import api, workflows
from onnxprune.runtime.backend import Backend
from tools.benchlib import ROOT, bench_resnet56, machine, publish, today

OUT = ROOT / "build" / "bench" / "ray"
LLM = ROOT / "build" / "llm"
BIG = ROOT / "build" / "bench" / "big" / "model.onnx"


def _interleaved(rounds: int, run_one, same) -> dict[str, list[float]]:
    """Wall seconds of ``run_one(backend)`` for local and ray, interleaved; every result checked ``same``."""
    times: dict[str, list[float]] = {"local": [], "ray": []}
    reference = None
    for r in range(rounds):
        for kind in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
            t0 = time.perf_counter()
            result = run_one(Backend(kind))
            times[kind].append(time.perf_counter() - t0)
            reference = reference if reference is not None else result
            if not same(result, reference):
                raise SystemExit(f"{kind} results differ from the first run's")
    return times


def overhead(images: int, rounds: int) -> dict:
    import ray

    from models.paths import cifar_data

    src = bench_resnet56()
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    startup = time.perf_counter() - t0
    cpus = int(ray.cluster_resources().get("CPU", 0))
    srinit = dict(method="srinit", data=cifar_data("jpeg"), offset=1017, limit=images, batch_size=250)
    sr_times = _interleaved(rounds, lambda b: [(u["name"], u["drop"], u["metrics"])
                                               for u in api.score(src, backend=b, **srinit).units],
                            lambda a, b: a == b)
    sweep = dict(data=cifar_data("lossless"), sparsities=(0.5, 0.7, 0.9), methods=("uniform", "lamp", "capacity"))
    sweep_times = _interleaved(rounds, lambda b: workflows.sweep(src, backend=b, **sweep).rows, lambda a, b: a == b)
    ray.shutdown()
    return {"images": images, "rounds": rounds, "startup": startup, "cpus": cpus,
            "srinit": sr_times, "sweep": sweep_times}


class _Recorder(Backend):
    """A ray backend of one slot that records the tasks and shared part SR-init would send, and stops."""

    def parallelism(self) -> int:
        return 1

    def map(self, fn, tasks, shared, progress=None):
        raise _Recorded(fn, tasks, shared)


class _Recorded(Exception):
    def __init__(self, fn, tasks, shared):
        super().__init__("recorded")
        self.fn, self.tasks, self.shared = fn, tasks, shared


def _srinit_work(path: Path, **options):
    """(task function, its shared part, every (unit, seed) pair, batch count) of SR-init on ``path``."""
    try:
        api.score(path, method="srinit", backend=_Recorder("ray"), **options)
    except _Recorded as recorded:
        pairs = [pair for task in recorded.tasks if task[1] == 0 for pair in task[0]]
        return recorded.fn, recorded.shared, pairs, len(recorded.shared["batches"])
    raise SystemExit("SR-init sent no tasks")


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _suffix_flop_fractions(path: Path, shared: dict, pairs: list) -> list[float]:
    """Each unit's suffix share of the layers' FLOPs (layers at or after the unit's first node)."""
    from onnxprune.scoring.common import received

    am = received(shared)
    position = {node.name: i for i, node in enumerate(am.model.graph)}
    flops = [(position[layer.node.name], layer.flops or 0) for layer in am.layers if layer.node.name in position]
    total = sum(f for _, f in flops)
    firsts = {name: min(position[n] for n in nodes if n in position) for name, nodes, _ in shared["units"]}
    return [sum(f for at, f in flops if at >= firsts[name]) / total for name, _ in pairs]


def model_costs(name: str, path: Path, samples_per_item: int, flops_per_item: float, **options) -> dict:
    """One task's costs on one thread: set-up, one pass of the whole model, the whole SR-init."""
    fn, shared, pairs, batches = _srinit_work(path, **options)
    shared = {**shared, "threads": 1}
    setup = min(_seconds(fn, shared, (pairs, 0, 0)) for _ in range(2))
    prefix_setup = _seconds(fn, shared, ([], 0, 0))
    forward = _seconds(fn, shared, ([], 0, batches)) - prefix_setup
    whole = _seconds(fn, shared, (pairs, 0, batches))
    items = sum(len(next(iter(feeds.values()))) for feeds, _ in shared["batches"])
    fractions = _suffix_flop_fractions(path, shared, pairs)
    return {"model": name, "units": len(pairs), "items": items, "tokens_per_item": samples_per_item,
            "model_bytes": sum(v.nbytes for v in _weights(path)), "setup": setup, "forward": forward,
            "srinit": whole, "passes_measured": (whole - setup) / forward,
            "passes_predicted": 1 + sum(fractions), "flops_per_item": flops_per_item,
            "flop_rate": (1 + sum(fractions)) * items * flops_per_item / (whole - setup)}


def _weights(path: Path):
    from onnxprune.io import load_model

    return [v.const_value for v in load_model(path).graph.initializers.values() if v.const_value is not None]


def big_setup() -> dict:
    """The set-up of a task holding the first layer's suffix (the whole 2.25 GiB model), and how much of it
    is the fresh draw (every layer drawn in order, the first one's kept, as that task does), on
    bench_bigmodel's model."""
    from onnxprune.scoring.srinit import fresh_init
    from onnxprune.verbs.loading import open_model
    from tools.bench_bigmodel import generate

    if not BIG.exists():
        BIG.parent.mkdir(parents=True, exist_ok=True)
        generate(BIG, 36, 4096)
    data = BIG.parent / "x.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((4, 4096)).astype(np.float32))
    fn, shared, pairs, _ = _srinit_work(BIG, units="layers", data=str(data))
    shared = {**shared, "threads": 1}
    am = open_model(BIG)
    draw = _seconds(fresh_init, am.layers, {n.name: n for n in am.model.graph}, 0, {am.layers[0].name})
    setup = _seconds(fn, shared, (pairs[:1], 0, 0))
    return {"model_bytes": sum(v.nbytes for v in _weights(BIG)), "setup_first_unit": setup, "fresh_draw": draw,
            "shipped_bytes": len(shared["model"])}


def _noop(shared, task):
    return task


def _touch(shared, task):
    t0 = time.perf_counter()
    total = int(shared[:: 1 << 20].sum())
    return time.perf_counter() - t0, total


def ray_costs(tasks: int = 200) -> dict:
    """Ray's per-task cost (a task that does nothing, one slot per CPU) and its object store on this node."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    backend, cpus = Backend("ray"), int(ray.cluster_resources().get("CPU", 1))
    backend.map(_noop, list(range(cpus * 2)), None)  # the workers started
    per_task = cpus * _seconds(backend.map, _noop, list(range(tasks)), None) / tasks
    array = np.ones(512 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    ref = ray.put(array)
    put = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = ray.get(ray.remote(_touch).remote(ref, 0))
    get = time.perf_counter() - t0
    ray.shutdown()
    return {"tasks": tasks, "cpus": cpus, "per_task": per_task, "put_gbs": array.nbytes / put / 1e9,
            "task_with_object": get, "object_bytes": array.nbytes, "touch": got[0]}


def kl_cost(vocab: int = 32000, tokens: int = 2048) -> float:
    """Seconds per token of SR-init's language-model metrics (KL and agreement against a reference worked
    out once per batch) at ``vocab``, one thread's numpy."""
    from onnxprune.runtime.language_model import TokenReference

    rng = np.random.default_rng(0)
    ref, new = (rng.standard_normal((1, tokens, vocab), dtype=np.float32) for _ in range(2))
    reference = TokenReference(ref)
    t0 = time.perf_counter()
    reference.kl(new)
    reference.disagreement(new)
    return (time.perf_counter() - t0) / tokens


def costs(images: int) -> dict:
    from models.paths import cifar_data
    from tools.bench_llm import ensure_model

    ensure_model()
    resnet = model_costs("ResNet-56", bench_resnet56(), 1, api.inspect(bench_resnet56()).flops,
                         data=cifar_data("jpeg"), offset=1017, limit=images, batch_size=250)
    decoder_path = LLM / "optimum" / "model.onnx"
    config = json.loads((LLM / "optimum" / "config.json").read_text())
    decoder = model_costs("decoder (small)", decoder_path, 128, _decoder_flops_per_token(config, 128) * 128,
                          units="transformer-layers", data=str(LLM / "calib.npz"), limit=64, batch_size=16)
    return {"resnet": resnet, "decoder": decoder, "big": big_setup(), "ray": ray_costs(), "kl_per_token": kl_cost()}


def _decoder_flops_per_token(config: dict, seq: int) -> float:
    """Matrix FLOPs per token of a Llama decoder at ``seq`` tokens (causal attention: half the positions)."""
    d, layers, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head = d // heads
    per_layer = 2 * (d * d * 2 + 2 * d * kv * head + 3 * d * ffn) + 2 * 2 * d * seq / 2
    return layers * per_layer + 2 * d * config["vocab_size"]


# --- the scale-out estimate (README "Scale-out") ------------------------------------------------------------
# What is assumed, not measured (no GPU or cluster here): an 8-node cluster of 8 H100 SXM 80 GB per node.
GPU = {"nodes": 8, "per_node": 8, "memory_gb": 80.0, "workspace_gb": 6.0,
       "decoder_tflops": 300.0,  # fp16 GEMMs of 2,048-token sequences: about 30 % of the 989 dense peak
       "cnn_tflops": 60.0,  # ResNet-50 fp16 at batch 256 under ONNX Runtime's CUDA provider: ~7,300 images/s
       "storage_gbs": 2.0,  # a node reading the model from shared storage (page cache shared by its workers)
       "network_gbs": 25.0,  # 200 Gb/s: the head node sending the object store's data to the others
       "host_device_gbs": 20.0,  # PCIe 5: activations to and from the host (the partial evaluator's cuts)
       "cpus_per_task": 8}  # --cpus-per-task 8 --gpus-per-task 1 on nodes of 64+ cores: the metrics' threads
LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "params": 6.74e9, "bytes_per_param": 2}
RESNET50 = {"stage_blocks": (3, 4, 6, 3), "flops": 8.2e9, "params": 25.6e6, "image_bytes": 3 * 224 * 224 * 4,
            "cut_bytes": 4 * (3 * 256 * 56 * 56 + 4 * 512 * 28 * 28 + 6 * 1024 * 14 * 14 + 3 * 2048 * 7 * 7)}


def _groups(fractions: list[float], weights_gb: float, budget_gb: float) -> int:
    """How many groups SR-init's --max-memory grouping makes (consecutive units, sessions held together)."""
    groups, used = 1, 0.0
    for f in fractions:
        if used and used + f * weights_gb > budget_gb:
            groups, used = groups + 1, 0.0
        used += f * weights_gb
    return groups


def estimate(measured: dict) -> dict:
    """Wall time of SR-init (one seed) on the assumed cluster: a 7B decoder on 1,000 x 2,048 tokens and
    ResNet-50 on 50,000 images, from this run's measured costs and the assumptions in GPU."""
    slots = GPU["nodes"] * GPU["per_node"]
    big = measured["big"]
    setup_s_per_gb = max(big["setup_first_unit"] - big["fresh_draw"], 0.0) / (big["model_bytes"] / 1e9)
    draw_s_per_param = big["fresh_draw"] / (big["model_bytes"] / 4)  # the fresh weights drawn, per parameter
    ray_task = measured["ray"]["per_task"]
    out = {}

    cfg = LLAMA_7B
    layers, tokens = cfg["num_hidden_layers"], 1000 * 2048
    per_token = _decoder_flops_per_token(cfg, 2048)
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    fractions = [((layers - u) * (per_token - head) / layers + head) / per_token for u in range(layers)]
    weights_gb = cfg["params"] * cfg["bytes_per_param"] / 1e9
    budget = GPU["memory_gb"] - weights_gb - GPU["workspace_gb"]  # beside the whole-model (prefix) session
    groups = _groups(fractions, weights_gb, budget)
    passes = groups + sum(fractions)
    compute = passes * tokens * per_token / (slots * GPU["decoder_tflops"] * 1e12)
    slices = -(-2 * slots // groups)
    tasks = groups * slices
    per_task_setup = setup_s_per_gb * weights_gb * (1 + sum(fractions) / groups) + draw_s_per_param * cfg["params"]
    metrics = measured["kl_per_token"] * tokens * layers / slots / GPU["cpus_per_task"]  # numpy, on the host
    load = weights_gb / GPU["storage_gbs"]
    out["decoder"] = {"groups": groups, "passes": passes, "tasks": tasks, "compute": compute,
                      "setup": per_task_setup * tasks / slots, "metrics": metrics, "load": load,
                      "ray": ray_task * tasks / slots,
                      "one_gpu": passes * tokens * per_token / (GPU["decoder_tflops"] * 1e12)
                      + groups * per_task_setup + metrics * slots + load,
                      "here": (1 + sum(fractions)) * tokens * per_token / measured["decoder"]["flop_rate"]}
    out["decoder"]["wall"] = sum(out["decoder"][k] for k in ("compute", "setup", "metrics", "load", "ray"))

    net = RESNET50
    blocks = [(stage, b) for stage, n in enumerate(net["stage_blocks"]) for b in range(n)]
    stage_share = 0.97 / len(net["stage_blocks"])  # the stem takes ~3 %, each stage about a quarter of the rest
    per_block = [stage_share / net["stage_blocks"][stage] for stage, _ in blocks]
    fractions = [sum(per_block[u:]) for u in range(len(blocks))]
    images = 50_000
    passes = 1 + sum(fractions)  # 16 suffix sessions of a 0.1 GB model: one group
    data_gb = images * net["image_bytes"] / 1e9
    compute = passes * images * net["flops"] / (slots * GPU["cnn_tflops"] * 1e12)
    traffic = images * net["cut_bytes"] * 2 / 1e9  # every cut out of the prefix, each unit's back in
    tasks = 2 * slots
    out["resnet50"] = {"groups": 1, "passes": passes, "tasks": tasks, "compute": compute, "data_gb": data_gb,
                       "put": data_gb / measured["ray"]["put_gbs"],
                       "spread": data_gb * (GPU["nodes"] - 1) / GPU["network_gbs"],
                       "traffic": traffic / slots / GPU["host_device_gbs"],
                       "setup": 2 * (setup_s_per_gb * net["params"] * 4 / 1e9 * (1 + sum(fractions))
                                     + draw_s_per_param * net["params"]), "ray": ray_task * tasks / slots,
                       "one_gpu": passes * images * net["flops"] / (GPU["cnn_tflops"] * 1e12)
                       + data_gb / measured["ray"]["put_gbs"] + traffic / GPU["host_device_gbs"]}
    r = out["resnet50"]
    r["wall"] = sum(r[k] for k in ("compute", "put", "spread", "traffic", "setup", "ray"))
    out["assumed"], out["setup_s_per_gb"], out["draw_s_per_param"] = GPU, setup_s_per_gb, draw_s_per_param
    return out


def run(images: int, rounds: int, part: str) -> dict:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    OUT.mkdir(parents=True, exist_ok=True)
    previous = json.loads((OUT / "result.json").read_text()) if (OUT / "result.json").exists() else {}
    result = dict(previous)
    if part in ("overhead", "all"):
        result["overhead"] = overhead(images, rounds)
    if part in ("costs", "all"):
        result["costs"] = costs(images)
    if "costs" in result:
        result["estimate"] = estimate(result["costs"])
    return result


def _minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    return f"{seconds / 60:,.1f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


def render(result: dict) -> str:
    lines = ["## Ray backend: overhead here, costs per task, and the scale-out estimate (issue 20)", ""]
    if "overhead" in result:
        o = result["overhead"]
        lines += [
            f"Measured {today()} on {machine()}: `python -m tools.bench_ray --images {o['images']} --rounds "
            f"{o['rounds']} --part all --write`.",
            "",
            f"Each job locally and on a local Ray cluster of this machine's {o['cpus']} CPUs (one CPU per task), "
            "interleaved; median wall seconds over the rounds, every Ray result equal to the local one (checked). "
            "SR-init: 27 residual blocks of ResNet-56, one seed, "
            f"{o['images']:,} JPEG images. Sweep: ResNet-56, uniform / lamp / capacity at 50 / 70 / 90 %, "
            "evaluated on the 1,017 lossless images (9 cells). The cluster's start-up is apart.",
            "",
            "| job | local s (median) | ray s (median) | ray / local | runs local | runs ray |",
            "|---|---:|---:|---:|---|---|",
        ]
        for job in ("srinit", "sweep"):
            local, on_ray = (statistics.median(o[job][k]) for k in ("local", "ray"))
            lines.append(f"| {job} | {local:.1f} | {on_ray:.1f} | **{on_ray / local:.2f}x** | "
                         f"{', '.join(f'{t:.1f}' for t in o[job]['local'])} | "
                         f"{', '.join(f'{t:.1f}' for t in o[job]['ray'])} |")
        lines += ["", f"- Target at most 1.3x: SR-init **{_verdict(o['srinit'])}**, sweep **{_verdict(o['sweep'])}**.",
                  f"- Cluster start-up (ray.init of a local instance): {o['startup']:.1f} s.", ""]
    if "costs" in result:
        c = result["costs"]
        lines += ["### Per-task costs (one thread, as a one-CPU task runs)", "",
                  "| model | weights | units | items | task set-up | one pass | SR-init task | passes measured "
                  "| passes predicted | FLOP/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in (c["resnet"], c["decoder"]):
            lines.append(f"| {m['model']} | {m['model_bytes'] / 2**20:.1f} MiB | {m['units']} | {m['items']} | "
                         f"{m['setup']:.2f} s | {m['forward']:.2f} s | {m['srinit']:.1f} s | "
                         f"{m['passes_measured']:.1f} | {m['passes_predicted']:.1f} | {m['flop_rate'] / 1e9:.0f} G |")
        b, r = c["big"], c["ray"]
        lines += [
            "",
            "- Passes: SR-init's time over one pass of the whole model; predicted: 1 (the whole model, once per "
            "group) + each unit's suffix share of the FLOPs. Items: images, or sequences of 128 tokens.",
            f"- 2.25 GiB external-data model (bench_bigmodel): shipped as {b['shipped_bytes'] / 1e3:.0f} kB "
            f"(weights by reference); a task holding the first layer's suffix (every weight) sets up in "
            f"{b['setup_first_unit']:.1f} s, of which {b['fresh_draw']:.1f} s draw the fresh weights (every layer "
            "in order, the first one's kept); the rest, over the weights' size, is the session set-up rate below.",
            f"- Ray: {r['per_task'] * 1e3:.1f} ms of a slot per task (a task that does nothing, {r['tasks']} tasks "
            f"on {r['cpus']} slots); object store put {r['put_gbs']:.1f} GB/s; a task reading a "
            f"{r['object_bytes'] / 2**20:.0f} MiB object: {r['task_with_object']:.2f} s round trip.",
            f"- Language-model metrics (KL and agreement, numpy) at a 32,000 vocabulary: "
            f"{c['kl_per_token'] * 1e3:.2f} ms per token and unit.",
            "",
        ]
    if "estimate" in result:
        e = result["estimate"]
        d, n, g = e["decoder"], e["resnet50"], e["assumed"]
        lines += [
            "### Scale-out estimate: 8 nodes x 8 H100 80 GB (on paper; see the README)", "",
            f"Assumed (no GPU or cluster here): decoder GEMMs at {g['decoder_tflops']:.0f} TFLOP/s, ResNet-50 at "
            f"{g['cnn_tflops']:.0f} TFLOP/s per GPU (fp16, ONNX Runtime CUDA), {g['cpus_per_task']} CPUs per task, "
            "shared storage "
            f"{g['storage_gbs']:.0f} GB/s per node, network {g['network_gbs']:.0f} GB/s, host-device "
            f"{g['host_device_gbs']:.0f} GB/s. Measured above: session set-up {e['setup_s_per_gb']:.2f} s per GB, "
            f"fresh draw {e['draw_s_per_param'] * 1e9:.1f} s per 10^9 parameters, Ray's cost per task, the "
            "metrics' cost per token, the object store's put rate.",
            "",
            "| SR-init, one seed | groups | passes | tasks | compute | set-up | metrics | data / model | other | "
            "**wall** | one GPU | this machine |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| 7B decoder, 32 layers, 1,000 x 2,048 tokens | {d['groups']} | {d['passes']:.1f} | {d['tasks']} | "
            f"{_minutes(d['compute'])} | {_minutes(d['setup'])} | {_minutes(d['metrics'])} | "
            f"{_minutes(d['load'])} | {d['ray']:.1f} s | **{_minutes(d['wall'])}** | "
            f"{_minutes(d['one_gpu'])} | {d['here'] / 86400:,.0f} days |",
            f"| ResNet-50, 16 blocks, 50,000 images | 1 | {n['passes']:.1f} | {n['tasks']} | "
            f"{_minutes(n['compute'])} | {_minutes(n['setup'])} | - | {_minutes(n['put'] + n['spread'])} | "
            f"{n['traffic'] + n['ray']:.1f} s | **{_minutes(n['wall'])}** | {_minutes(n['one_gpu'])} | - |",
            "",
            "Set-up is per slot: two tasks each (2 x 64 tasks), each making its group's sessions and drawing the "
            "fresh weights of every layer. Metrics: KL and agreement of every unit on every token, in numpy on "
            "the task's CPUs. Data / model: the decoder's weights read once per node from shared storage; "
            "ResNet-50's 50,000 float32 images put in the object store and sent to the other 7 nodes. Other: Ray's "
            "cost per task, and ResNet-50's cut activations between host and GPU. One GPU: the same job as one "
            "task per group on one GPU; this machine: its compute at the small decoder's FLOP/s measured on one thread.",
        ]
    return "\n".join(lines) + "\n"


def _verdict(times: dict) -> str:
    return "met" if statistics.median(times["ray"]) / statistics.median(times["local"]) <= 1.3 else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=("overhead", "costs", "all"), default="all")
    parser.add_argument("--write", action="store_true", help="replace the ray section of BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args.images, args.rounds, args.part)
    publish(result, OUT / "result.json", render(result), "ray", args.write)


if __name__ == "__main__":
    main()
