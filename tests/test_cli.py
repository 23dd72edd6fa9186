"""The CLI contracts: JSON forms, exit codes, one-line errors without traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onnxprune.errors import InputError

CLI = [sys.executable, "-m", "onnxprune.cli"]


def run(*args, check_rc: int | None = 0):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_inspect_json_contract(export):
    proc = run("inspect", export("resnet56"), "--json")
    data = json.loads(proc.stdout)
    for layer in data["layers"]:
        assert {"name", "op_type", "weight", "params", "flops"} <= set(layer)
    for block in data["blocks"]:
        assert {"name", "params", "flops", "skip", "removable", "layers"} <= set(block)
        assert block["skip"] in ("identity", "parameter-free", "projection")
    assert data["totals"]["params"] == 850_986 and data["totals"]["flops"] == 250_971_392
    assert len(data["fingerprint"]) == 32


def test_inspect_table(export):
    proc = run("inspect", export("resnet-proj"))
    assert "projection" in proc.stdout and "Totals:" in proc.stdout


def test_eval_json_contract(export, cifar_lossless):
    proc = run("eval", export("resnet56"), "--data", cifar_lossless, "--mean", "0.485,0.456,0.406",
               "--std", "0.229,0.224,0.225", "--limit", "256", "--json")
    data = json.loads(proc.stdout)
    assert {"top1", "top5", "samples", "seconds", "provider"} <= set(data)
    assert data["samples"] == 256 and 85 < data["top1"] <= 100


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["inspect", "nope.onnx"], "not found"),
        (["eval", "{mlp}", "--data", "nope.npz"], "data file not found"),
        (["eval", "{mlp}"], "exactly one of --data"),
        (["eval", "{mlp}", "--data", "{digits}", "--mean", "a,b"], "comma-separated"),
        (["eval", "{mlp}", "--data", "{digits}", "--batch-size", "0"], "at least 1"),
        (["score", "{mlp}", "--method", "srinit", "--data", "{digits}", "--max-memory", "lots", "-o", "{out}"],
         "must be a positive size"),
        (["score", "{mlp}", "--method", "srinit", "--data", "{digits}", "-o", "{out}"], "no residual blocks"),
    ],
)
def test_bad_input_one_line_exit_2(export, digits_npz, tmp_path, args, fragment):
    out = tmp_path / "scores.json"
    args = [a.format(mlp=export("mlp"), digits=digits_npz, out=out) for a in args]
    proc = run(*args, check_rc=2)
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
    assert not out.exists()


def test_parse_size():
    from onnxprune.runtime.data import parse_size

    assert parse_size("2GB", "max-memory") == 2 << 30
    assert parse_size("512 MiB", "max-memory") == 512 << 20
    assert parse_size("1.5g", "max-memory") == 3 << 29
    assert parse_size("4096", "max-memory") == 4096
    for bad in ("0", "-1GB", "GB", "2XB"):
        with pytest.raises(InputError, match="positive size"):
            parse_size(bad, "max-memory")


def test_debug_shows_traceback():
    proc = run("inspect", "nope.onnx", "--debug", check_rc=None)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_usage_error_exit_2():
    assert run("inspect", check_rc=2).returncode == 2
    assert "Usage" in run("frobnicate", check_rc=2).stderr


def test_help_has_examples():
    """Every command's --help has an example and the common options."""
    from onnxprune.cli import main

    assert set(main.commands) >= {"inspect", "score", "allocate", "apply", "eval", "finetune", "prune", "sweep",
                                  "report"}
    for cmd in main.commands:
        text = run(cmd, "--help").stdout
        assert "Example" in text and "--json" in text and "--quiet" in text and "--debug" in text, cmd


def test_channel_pipeline_reaches_flop_target(export, tmp_path, cifar_lossless):
    """allocate --granularity channel --budget flops, then apply: the written model has about half the FLOPs
    (measured by inspect on the output), runs, and the JSON says what was removed."""
    model = export("resnet56")
    plan = tmp_path / "ch.json"
    run("allocate", model, "--method", "lamp", "--granularity", "channel", "--budget", "flops",
        "--target-sparsity", "0.5", "--round-to", "1", "-o", plan)
    out = tmp_path / "small.onnx"
    data = json.loads(run("apply", model, plan, "-o", out, "--json").stdout)
    assert data["totals"]["granularity"] == "channel" and data["totals"]["channels_removed"] > 0
    after = json.loads(run("inspect", out, "--json").stdout)["totals"]
    before = json.loads(run("inspect", model, "--json").stdout)["totals"]
    assert abs(1 - after["flops"] / before["flops"] - 0.5) < 0.02
    acc = json.loads(run("eval", out, "--data", cifar_lossless, "--limit", "64", "--json").stdout)
    assert acc["samples"] == 64
