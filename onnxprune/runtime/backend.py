"""Where independent pieces of measured work run: in this process, or as Ray tasks on a cluster.

A scorer cuts its work into tasks that need nothing from each other (SR-init: groups of (unit, seed)
pairs), names one function that does a task given what every task shares (the model's bytes, the
calibration batches, the options), and merges the results in task order. ``Backend.map`` runs that
function over the tasks: ``local`` one after another in this process, ``ray`` as Ray tasks, the shared
part put in Ray's object store once. The function is the same either way, so the numbers are too.

Ray is optional (``pip install onnxprune[ray]``). Its usage reporting is switched off and its log lines kept
off the terminal (the cluster's own messages, a retried task's for one, go to the ``onnxprune.ray`` logger);
an address that does not answer, or a cluster of another Ray version, is one line (exit 2); Ctrl-C cancels
the tasks still running. A task whose worker dies is retried by Ray.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxprune.errors import InputError

__all__ = ["BACKENDS", "Backend"]

BACKENDS = ("local", "ray")
RETRIES = 3  # times Ray reruns a task whose worker died
_log = logging.getLogger("onnxprune.ray")


@dataclass(frozen=True)
class Backend:
    kind: str = "local"  # local | ray
    address: str | None = None  # ray: a running cluster (host:port, ray://host:port or auto); None: start one
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0

    def __post_init__(self):
        if self.kind not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.kind!r}")
        if self.kind == "local" and (self.address or self.gpus_per_task):
            raise InputError("--address and --gpus-per-task go with --backend ray")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise InputError("--cpus-per-task must be positive and --gpus-per-task at least 0")

    def check(self) -> None:
        """Fail fast (one line) when ``address`` does not answer, before any other work."""
        if self.kind == "ray" and self.address:
            _ray()
            _reachable(self.address)

    def record(self) -> dict:
        """What a result records about where it ran (the numbers do not depend on it)."""
        return {"backend": self.kind, **({"address": self.address} if self.address else {})}

    @property
    def task_threads(self) -> int:
        """ONNX Runtime threads of one task: its share of the node's CPUs, not every core."""
        return max(int(self.cpus_per_task), 1)

    def parallelism(self) -> int:
        """How many tasks run at once: 1 here; on Ray, the cluster's CPUs (or GPUs) over a task's share."""
        if self.kind == "local":
            return 1
        resources = _connect(self).cluster_resources()
        if self.gpus_per_task:
            return max(int(resources.get("GPU", 0) // self.gpus_per_task), 1)
        return max(int(resources.get("CPU", 1) // self.cpus_per_task), 1)

    def map(self, fn: Callable[[Any, Any], Any], tasks: Sequence, shared: Any,
            progress: Callable[[int, int], None] | None = None) -> list:
        """``[fn(shared, task) for task in tasks]``, run here or on the cluster; results in task order."""
        if self.kind == "local":
            out = []
            for task in tasks:
                out.append(fn(shared, task))
                if progress:
                    progress(len(out), len(tasks))
            return out
        return _ray_map(self, fn, tasks, shared, progress)


def _ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray needs Ray: pip install 'onnxprune[ray]'") from None
    _raylet_messages_to_log(ray)
    return ray


def _raylet_messages_to_log(ray) -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) A worker died ...", "Task ... will be
    retried") on stdout whatever ``log_to_driver`` says (its listen_error_messages thread calls
    ``ray._private.worker.print_to_stdstream``). A retried task is Ray's business, and stdout may carry
    JSON: they go to the ``onnxprune.ray`` logger at debug level instead. Ray's workers' own output is
    off already (``log_to_driver=False``), so nothing else passes through that function."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is None or getattr(worker.print_to_stdstream, "onnxprune", False):
        return

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", ()):
            _log.debug("(%s) %s", data.get("pid"), line)

    to_log.onnxprune = True
    worker.print_to_stdstream = to_log


def _reachable(address: str) -> None:
    """A quick TCP check of host:port, so that a wrong address is an error in seconds, not a long hang."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise InputError(f"no Ray cluster answers at --address {address} ({exc}); start one with `ray start "
                         "--head` or give the address it printed") from None


def _connect(backend: Backend):
    ray = _ray()
    if backend.address:
        _reachable(backend.address)
    if ray.is_initialized():  # joined before in this process (or by the caller's own ray.init)
        return ray
    package = str(Path(__file__).resolve().parents[1])  # the onnxprune package, shipped to the workers
    try:
        ray.init(address=backend.address, log_to_driver=False, logging_level="ERROR", include_dashboard=False,
                 runtime_env={"py_modules": [package]} if backend.address else None,
                 configure_logging=True)
    except (ConnectionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not join the Ray cluster at {backend.address or 'a new local one'}: {first}") \
            from None
    return ray


def _get(ray, ref):
    """A task's result; a bad-input error raised in the task is raised here as it is (one line, exit 2)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(getattr(exc, "cause", None), InputError):
            raise exc.cause from None
        raise


def _ray_map(backend: Backend, fn, tasks: Sequence, shared, progress) -> list:
    ray = _connect(backend)
    shared_ref = ray.put(shared)
    remote = ray.remote(num_cpus=backend.cpus_per_task, num_gpus=backend.gpus_per_task, max_retries=RETRIES)(fn)
    refs = [remote.remote(shared_ref, task) for task in tasks]
    position = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, done_count = list(refs), 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[position[ref]] = _get(ray, ref)
                done_count += 1
                if progress:
                    progress(done_count, len(refs))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results
