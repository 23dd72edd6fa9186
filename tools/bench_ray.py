"""Benchmark of issue 20: the Ray backend's overhead on this machine (a cluster here cannot be faster).

SR-init on ResNet-56 (27 blocks, ``--images`` JPEG images from 1017 on), run locally and on a local Ray
cluster of this machine's CPUs, interleaved (local, ray, ray, local, ...) for ``--rounds`` rounds; the
cluster's start-up is measured once, apart. The scores of every Ray run are checked equal to the local
ones. Target: Ray wall time at most 1.3x the local path's.

    python -m tools.bench_ray [--images 2000] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from onnxprune import api
from tools.benchlib import ROOT, bench_resnet56, machine, publish, today

OUT = ROOT / "build" / "bench" / "ray"


def run(images: int, rounds: int) -> dict:
    from models.paths import cifar_data

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    OUT.mkdir(parents=True, exist_ok=True)
    src = bench_resnet56()
    options = dict(method="srinit", data=cifar_data("jpeg"), offset=1017, limit=images, batch_size=250)
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    startup = time.perf_counter() - t0
    cpus = int(ray.cluster_resources().get("CPU", 0))
    times: dict[str, list[float]] = {"local": [], "ray": []}
    reference = None
    for r in range(rounds):
        for kind in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
            t0 = time.perf_counter()
            scores = api.score(src, backend=api.Backend(kind), **options)
            times[kind].append(time.perf_counter() - t0)
            numbers = [(u["name"], u["drop"], u["metrics"]) for u in scores.units]
            reference = reference or numbers
            if numbers != reference:
                raise SystemExit(f"{kind} scores differ from the first run's")
    ray.shutdown()
    return {"images": images, "rounds": rounds, "startup": startup, "cpus": cpus, "times": times}


def render(result: dict) -> str:
    local, on_ray = (statistics.median(result["times"][k]) for k in ("local", "ray"))
    ratio = on_ray / local
    return "\n".join([
        "## Ray backend overhead: SR-init on ResNet-56 (issue 20)",
        "",
        f"Measured {today()} on {machine()}: `python -m tools.bench_ray --images {result['images']} --rounds "
        f"{result['rounds']} --write`.",
        "",
        f"SR-init (27 residual blocks, one seed) on {result['images']:,} JPEG images, locally and on a local Ray "
        f"cluster of this machine's {result['cpus']} CPUs (one CPU per task), interleaved; median wall seconds "
        "over the rounds, the scores equal in every run (checked). The cluster's start-up is apart.",
        "",
        "| path | seconds (median) | runs |",
        "|---|---:|---|",
        f"| local | {local:.1f} | {', '.join(f'{t:.1f}' for t in result['times']['local'])} |",
        f"| ray | {on_ray:.1f} | {', '.join(f'{t:.1f}' for t in result['times']['ray'])} |",
        "",
        f"- Ray over local: {ratio:.2f}x (target at most 1.3x: **{'met' if ratio <= 1.3 else 'missed'}**).",
        f"- Cluster start-up (ray.init of a local instance): {result['startup']:.1f} s.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the ray section of BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args.images, args.rounds)
    publish(result, OUT / "result.json", render(result), "ray", args.write)


if __name__ == "__main__":
    main()
