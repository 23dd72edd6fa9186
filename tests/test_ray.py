"""The Ray backend on a local cluster started here (2 CPUs on 127.0.0.1, shut down after): SR-init (tasks of any
shape: groups x slices of the data), sensitivity and compactness scores, sweep rows and prune's blocks equal
the local path's, an external-data model travels by reference, a worker that dies mid-task is retried to the
same result (its message kept off the terminal), Ctrl-C cancels the tasks, a wrong address is one line
(exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxprune import api, workflows
from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.scoring.common import batch_slices

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield api.Backend("ray")
    ray.shutdown()


def _numbers(scores) -> list:
    return [(u["name"], u["drop"], u["drop_se"], u.get("drop_seed_std"), u["metrics"]) for u in scores.units]


@pytest.mark.parametrize("units,seeds", [("blocks", 3), ("layers", 2)])
def test_srinit_on_ray_equals_the_local_path(export, cifar_jpeg, cluster, units, seeds):
    path = export("resnet20")
    options = dict(method="srinit", data=cifar_jpeg, offset=1017, limit=96, batch_size=32, units=units,
                   seed=5, seeds=seeds)
    local = api.score(path, **options)
    on_ray = api.score(path, backend=cluster, **options)
    assert _numbers(on_ray) == _numbers(local)
    assert on_ray.options["reference"] == local.options["reference"]
    assert on_ray.options["backend"] == "ray" and local.options["backend"] == "local"
    # each worker asks for the provider the user asked for (auto), not for the driver's (which may have no
    # GPU), and the scores record what the workers' sessions really got
    assert on_ray.options["provider"] == local.options["provider"] == "cpu"


@pytest.mark.parametrize("max_memory", [None, 1])
def test_srinit_tasks_of_any_shape_equal_the_local_path(export, cifar_jpeg, cluster, max_memory):
    """The 9 blocks' sessions fit in one group, so the tasks are that group on each of the 3 batches, and
    every unit's per-batch sums come from three tasks, merged in batch order; with --max-memory 1 byte each
    (block, seed) pair is a group of its own over all the data."""
    path = export("resnet20")
    assert batch_slices(3, 1, cluster) == [(0, 1), (1, 2), (2, 3)] and batch_slices(3, 18, cluster) == [(0, 3)]
    options = dict(method="srinit", data=cifar_jpeg, offset=1017, limit=96, batch_size=32, units="blocks",
                   seed=1, seeds=2)
    local = api.score(path, **options)
    on_ray = api.score(path, backend=cluster, max_memory=max_memory, **options)
    assert _numbers(on_ray) == _numbers(local)
    assert on_ray.options["reference"] == local.options["reference"]
    assert on_ray.options["passes"] == (1 if max_memory is None else 18)


@pytest.mark.parametrize("method,extra", [("sensitivity", {"grid": (0.5, 0.9)}), ("compactness", {})])
def test_layer_measures_on_ray_equal_the_local_path(export, cifar_jpeg, cluster, method, extra):
    path = export("resnet20")
    options = dict(method=method, data=cifar_jpeg, offset=1017, limit=64, batch_size=32, **extra)
    local, on_ray = api.score(path, **options), api.score(path, backend=cluster, **options)
    assert on_ray.units == local.units
    assert on_ray.options["reference"] == local.options["reference"]
    assert on_ray.options["provider"] == "auto" and local.options["provider"] == "cpu"  # asked of the workers


def test_sweep_on_ray_equals_the_local_path(export, cifar_lossless, cluster):
    path = export("resnet20")
    options = dict(data=cifar_lossless, limit=128, sparsities=(0.5, 0.8), methods=("uniform", "lamp"))
    local, on_ray = workflows.sweep(path, **options), workflows.sweep(path, backend=cluster, **options)
    assert on_ray.rows == local.rows and on_ray.dense == local.dense and on_ray.options["backend"] == "ray"


def test_prune_on_ray_removes_the_blocks_the_local_path_removes(export, cifar_jpeg, cluster, tmp_path):
    path = export("resnet20")
    options = dict(remove_blocks=2, data=cifar_jpeg, offset=1017, limit=64, latency=False)
    local = workflows.prune(path, tmp_path / "local.onnx", **options)
    on_ray = workflows.prune(path, tmp_path / "ray.onnx", backend=cluster, **options)
    blocks = [api.load_plan(r.plan_path).blocks for r in (local, on_ray)]
    assert blocks[0] == blocks[1] and len(blocks[0]) == 2
    assert on_ray.after.params == local.after.params


def _dies_once(shared: dict, task: int) -> int:
    """Kills its worker process the first time it runs task 1 (a marker file remembers), then works."""
    marker = Path(shared["folder"]) / f"died_{task}"
    if task == 1 and not marker.exists():
        marker.write_text("x")
        os._exit(1)
    return task * shared["factor"]


def test_a_task_whose_worker_dies_is_retried_to_the_same_result(cluster, tmp_path, capfd, caplog):
    """...and Ray's message about the dead worker reaches the onnxprune.ray log, not the terminal."""
    import time

    caplog.set_level("DEBUG", logger="onnxprune.ray")
    shared = {"folder": str(tmp_path), "factor": 7}
    want = api.Backend().map(_dies_once, [0, 2, 3], shared) + [7]
    got = cluster.map(_dies_once, [0, 2, 3, 1], shared)
    assert sorted(got) == sorted(want) and got[-1] == 7 and (tmp_path / "died_1").exists()
    deadline = time.monotonic() + 20
    while "worker died" not in caplog.text and time.monotonic() < deadline:  # Ray publishes it a bit later
        time.sleep(0.2)
    assert "worker died" in caplog.text
    printed = capfd.readouterr()
    assert "worker died" not in printed.out + printed.err and "raylet" not in printed.out + printed.err


def test_an_address_nobody_answers_is_one_line(tmp_path, export, digits_npz):
    result = CliRunner().invoke(main, ["score", str(export("cnn")), "--method", "srinit", "--units", "layers",
                                       "--data", str(digits_npz),
                                       "--backend", "ray", "--address", "127.0.0.1:9", "-o",
                                       str(tmp_path / "s.json")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster answers at --address 127.0.0.1:9" in lines[0], result.stderr
    assert not (tmp_path / "s.json").exists()


def test_ray_options_need_the_ray_backend():
    with pytest.raises(InputError, match="--backend ray"):
        api.Backend("local", address="127.0.0.1:6379")


def test_srinit_survives_a_worker_killed_mid_run(export, cifar_jpeg, cluster):
    """A worker running an SR-init task is killed (SIGKILL) while it works: Ray reruns the task and the
    scores still equal the local path's."""
    import signal
    import threading
    import time

    path = export("resnet20")
    options = dict(method="srinit", data=cifar_jpeg, offset=1017, limit=256, batch_size=32, seed=3)
    local = api.score(path, **options)
    killed = []

    def kill_one() -> None:  # Ray titles a busy worker's process ray::_unit_task
        deadline = time.time() + 60
        while time.time() < deadline:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if b"_unit_task" in cmdline.read_bytes():
                        os.kill(int(cmdline.parent.name), signal.SIGKILL)
                        killed.append(cmdline.parent.name)
                        return
                except OSError:  # the process ended meanwhile
                    continue
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    on_ray = api.score(path, backend=cluster, **options)
    killer.join()
    assert killed, "no SR-init task was seen running"
    assert _numbers(on_ray) == _numbers(local)


def test_an_external_data_model_is_shipped_by_reference(cluster, tmp_path):
    """A model with external data travels as its graph with references to the data file (which workers read
    from the same path, memory-mapped), not as its weights' bytes: SR-init and sensitivity equal the local
    path's."""
    import numpy as np

    from onnxprune.scoring.common import shipped
    from onnxprune.verbs.loading import open_model
    from tools.bench_bigmodel import generate

    path = generate(tmp_path / "ext.onnx", layers=8, side=512)
    assert len(shipped(open_model(path))["model"]) < 100_000
    np.savez(tmp_path / "x.npz", input=np.random.default_rng(2).standard_normal((32, 512)).astype(np.float32))
    for options in (dict(method="srinit", units="layers", seeds=2), dict(method="sensitivity", grid=(0.5,))):
        local, on_ray = (api.score(path, data=str(tmp_path / "x.npz"), batch_size=8, backend=b, **options)
                         for b in (api.Backend(), cluster))
        assert repr(on_ray.units) == repr(local.units)  # as text: no labels, top1 is NaN in both


def _sleeps_then_marks(shared: dict, task: int) -> int:
    import time

    time.sleep(shared["seconds"])
    (Path(shared["folder"]) / f"done_{task}").write_text("x")
    return task


def test_ctrl_c_cancels_the_tasks(cluster, tmp_path):
    """Ctrl-C while tasks run: KeyboardInterrupt reaches the caller, and the tasks running and waiting are
    cancelled (none of them finishes afterwards); the cluster still runs the next job."""
    import _thread
    import threading
    import time

    shared = {"folder": str(tmp_path), "seconds": 3.0}
    cluster.map(_sleeps_then_marks, [], shared)  # joined; workers may still be starting
    threading.Timer(1.5, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        cluster.map(_sleeps_then_marks, list(range(6)), shared)
    time.sleep(5)  # long enough for every task to have finished, had it not been cancelled
    assert not list(tmp_path.glob("done_*"))
    assert cluster.map(_sleeps_then_marks, [7], {**shared, "seconds": 0.0}) == [7]
