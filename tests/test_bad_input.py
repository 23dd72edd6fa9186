"""Every bad input, through the CLI: one line naming the problem and what to do, exit code 2 (bad input) or
1 (write failure), no traceback, nothing on stdout, no file left behind and every input byte-identical.

The commands run in-process (click's CliRunner: the same code path as the console script, without paying
for an interpreter start per case); test_cli.py checks the same contract through real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxprune.cli import main
from tests.graphs import make_model, tensor

# ---------------------------------------------------------------------------------------------------------
# fixtures: a folder of good inputs (copied per test) and the bad models


@pytest.fixture(scope="module")
def inputs(export, digits_npz, tmp_path_factory) -> Path:
    """mlp.onnx, cnn.onnx, digits.npz, plan.json and scores.json for mlp, and the bad models and data."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(export("mlp"), d / "mlp.onnx")
    shutil.copy(export("cnn"), d / "cnn.onnx")
    shutil.copy(digits_npz, d / "digits.npz")
    runner = CliRunner()
    for args in (["allocate", d / "mlp.onnx", "--method", "uniform", "--target-sparsity", "0.5", "-o", d / "plan.json"],
                 ["allocate", d / "mlp.onnx", "--method", "uniform", "--granularity", "channel",
                  "--target-sparsity", "0.3", "-o", d / "plan_ch.json"],
                 ["score", d / "mlp.onnx", "-o", d / "scores.json"]):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    bad = d / "bad"
    bad.mkdir()
    (bad / "dir.onnx").mkdir()
    (bad / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    data = (d / "cnn.onnx").read_bytes()
    (bad / "truncated.onnx").write_bytes(data[: len(data) // 2])
    proto = onnx.load(str(d / "mlp.onnx"))
    onnx.save(proto, str(bad / "external.onnx"), save_as_external_data=True, location="external.onnx.data",
              size_threshold=0)
    (bad / "external.onnx.data").unlink()
    relu = helper.make_node("Relu", ["undefined"], ["logits"])
    graph = helper.make_graph([relu], "g", [tensor("input", "N", 4)], [tensor("logits", "N", 4)])
    invalid = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    invalid.ir_version = 10
    onnx.save(invalid, str(bad / "invalid.onnx"))
    old = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                                              [tensor("input", "N", 4)], [tensor("logits", "N", 4)]),
                            opset_imports=[helper.make_opsetid("", 6)])
    old.ir_version = 10
    onnx.save(old, str(bad / "opset6.onnx"))
    nodes = [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Add", ["r", "input"], ["logits"])]
    onnx.save(make_model(nodes, [tensor("input", "N", 1, 8, 8)], [tensor("logits", "N", 1, 8, 8)]),
              str(bad / "noprune.onnx"))

    with np.load(d / "digits.npz") as z:
        x, y = z["x"], z["y"]
    np.savez(bad / "shape.npz", x=x[:, :, :4, :], y=y)
    np.savez(bad / "strings.npz", x=np.full(x.shape, "a"), y=y)
    np.savez(bad / "complex.npz", x=x.astype(np.complex64), y=y)
    np.savez(bad / "labels.npz", x=x, y=y[:100])
    np.savez(bad / "float_labels.npz", x=x, y=y.astype(np.float32) + 0.5)
    np.savez(bad / "pickled.npz", x=np.array([{"a": 1}] * len(y), dtype=object), y=y)
    np.savez(bad / "other_key.npz", images=x, y=y)
    (bad / "notzip.npz").write_bytes(b"not a zip file")

    plan = json.loads((d / "plan.json").read_text())
    (bad / "notjson.json").write_text("{not json")
    (bad / "list.json").write_text("[1, 2]")
    (bad / "schema.json").write_text(json.dumps({**plan, "schema": "something/else"}))
    (bad / "sparsity.json").write_text(json.dumps({**plan, "layers": [{**plan["layers"][0], "sparsity": 1.5}]}))
    (bad / "layers.json").write_text(json.dumps({**plan, "layers": {"fc": 0.5}}))
    (bad / "unknown_layer.json").write_text(json.dumps({**plan, "layers": [{"name": "nope", "sparsity": 0.5}]}))
    runner.invoke(main, ["allocate", str(d / "cnn.onnx"), "--method", "uniform", "--target-sparsity", "0.5",
                         "-o", str(bad / "cnn_plan.json")])
    runner.invoke(main, ["score", str(d / "cnn.onnx"), "-o", str(bad / "cnn_scores.json")])
    (bad / "loader.py").write_text("def load_data():\n    raise RuntimeError('the dataset server is down')\n")
    return d


@pytest.fixture()
def work(inputs, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the inputs; the test's working directory (outputs land in ``out/``)."""
    d = tmp_path / "work"
    shutil.copytree(inputs, d)
    (d / "out").mkdir()
    monkeypatch.chdir(d)
    return d


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(work: Path, args: list[str], fragment: str, rc: int = 2, **invoke):
    """Run the CLI; check the whole bad-input contract and return the error line."""
    before = snapshot(work)
    result = CliRunner().invoke(main, args, **invoke)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == rc, (result.exit_code, result.stderr, result.exception)
    # one line for the error; a failure after work began may follow that work's progress lines
    assert lines and all(line.startswith(("epoch ", "note:")) for line in lines[:-1]), result.stderr
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert snapshot(work) == before  # inputs byte-identical, no output or temporary file left
    _record_golden(work, lines[-1])
    return lines[-1]


def _record_golden(work: Path, line: str) -> None:
    """With ONNXPRUNE_GOLDEN_ERRORS=FILE, append the error line (paths made relative) for tools/golden.py diffs."""
    target = os.environ.get("ONNXPRUNE_GOLDEN_ERRORS")
    if target:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(target, "a") as f:
            f.write(json.dumps({"test": test, "line": line.replace(str(work), "<work>")}) + "\n")


# ---------------------------------------------------------------------------------------------------------
# bad model files, through every command

COMMANDS = {
    "inspect": ["inspect", "{m}"],
    "score": ["score", "{m}", "-o", "out/s.json"],
    "allocate": ["allocate", "{m}", "--method", "uniform", "--target-sparsity", "0.5", "-o", "out/p.json"],
    "apply": ["apply", "{m}", "plan.json", "-o", "out/pruned.onnx"],
    "eval": ["eval", "{m}", "--data", "digits.npz"],
    "finetune": ["finetune", "{m}", "--data", "digits.npz", "--epochs", "1", "-o", "out/tuned.onnx"],
}
BAD_MODELS = {
    "missing": ("bad/nope.onnx", "model file not found"),
    "directory": ("bad/dir.onnx", "is a directory"),
    "random-bytes": ("bad/random.onnx", "cannot read"),
    "truncated": ("bad/truncated.onnx", "cannot read"),
    "external-data-missing": ("bad/external.onnx", "external data file"),
    "checker": ("bad/invalid.onnx", "is not a valid ONNX model"),
    "opset": ("bad/opset6.onnx", "opset 6"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_files(work, command, case):
    path, fragment = BAD_MODELS[case]
    result_line = fails_cleanly(work, [a.format(m=path) for a in COMMANDS[command]], fragment)
    assert result_line.startswith("error:") and ("; " in result_line)  # the problem, then what to do


@pytest.mark.parametrize("args, fragment", [
    (["score", "bad/noprune.onnx", "-o", "out/s.json"], "no prunable layers"),
    (["allocate", "bad/noprune.onnx", "--method", "lamp", "--target-sparsity", "0.5", "-o", "out/p.json"],
     "no prunable layers"),
    (["score", "mlp.onnx", "--method", "srinit", "--data", "digits.npz", "-o", "out/s.json"], "no residual blocks"),
], ids=["score", "allocate", "srinit"])
def test_nothing_to_prune(work, args, fragment):
    fails_cleanly(work, args, fragment)


def test_inspect_without_prunable_layers_is_not_an_error(work):
    result = CliRunner().invoke(main, ["inspect", "bad/noprune.onnx", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["layers"] == 0
    assert "no prunable layers" in result.stderr


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_target_sparsity_outside_range(work, value):
    fails_cleanly(work, ["allocate", "mlp.onnx", "--method", "uniform", "--target-sparsity", value,
                         "-o", "out/p.json"], "must be in [0, 1)")


@pytest.mark.parametrize("plan, fragment", [
    ("bad/nope.json", "plan file not found"),
    ("bad/notjson.json", "is not valid JSON"),
    ("bad/list.json", "is not a JSON object"),
    ("bad/schema.json", "expected 'onnxprune.plan/1'"),
    ("bad/sparsity.json", "it must be in [0, 1)"),
    ("bad/layers.json", "'layers' must be a list"),
    ("bad/unknown_layer.json", "not in the model"),
    ("bad/cnn_plan.json", "made for another model"),
    ("scores.json", "expected 'onnxprune.plan/1'"),
])
def test_bad_plans(work, plan, fragment):
    fails_cleanly(work, ["apply", "mlp.onnx", plan, "-o", "out/pruned.onnx"], fragment)


@pytest.mark.parametrize("scores, fragment", [
    ("bad/cnn_scores.json", "made for another model"),
    ("bad/notjson.json", "is not valid JSON"),
    ("plan.json", "expected 'onnxprune.scores/1'"),
])
def test_bad_scores(work, scores, fragment):
    fails_cleanly(work, ["allocate", "mlp.onnx", "--scores", scores, "--method", "capacity",
                         "--target-sparsity", "0.5", "-o", "out/p.json"], fragment)


DATA_COMMANDS = {
    "eval": ["eval", "mlp.onnx", "--data", "{d}"],
    "sensitivity": ["score", "mlp.onnx", "--method", "sensitivity", "--data", "{d}", "-o", "out/s.json"],
    "search": ["allocate", "mlp.onnx", "--method", "search", "--target-sparsity", "0.5", "--data", "{d}",
               "-o", "out/p.json"],
    "apply-refit": ["apply", "mlp.onnx", "plan_ch.json", "--data", "{d}",
                    "-o", "out/pruned.onnx"],
    "finetune": ["finetune", "mlp.onnx", "--data", "{d}", "--epochs", "1", "-o", "out/tuned.onnx"],
}
BAD_DATA = {
    "missing": ("bad/nope.npz", "data file not found"),
    "not-npz": ("bad/notzip.npz", "cannot read"),
    "pickled": ("bad/pickled.npz", "allow_pickle=False"),
    "key": ("bad/other_key.npz", "has no array 'x'"),
    "shape": ("bad/shape.npz", "does not match model input"),
    "dtype-str": ("bad/strings.npz", "cannot feed model input"),
    "dtype-complex": ("bad/complex.npz", "cannot feed model input"),
    "label-count": ("bad/labels.npz", "100 labels"),
    "label-values": ("bad/float_labels.npz", "not class indices"),
}


@pytest.mark.parametrize("command", list(DATA_COMMANDS))
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data(work, command, case):
    path, fragment = BAD_DATA[case]
    fails_cleanly(work, [a.format(d=path) for a in DATA_COMMANDS[command]], fragment)


def test_failing_loader_script_is_bad_input(work):
    line = fails_cleanly(work, ["eval", "mlp.onnx", "--data-loader-script", "bad/loader.py"], "the dataset server is down")
    assert "data loader script" in line and "fix the script" in line


# ---------------------------------------------------------------------------------------------------------
# output paths


@pytest.mark.parametrize("args, fragment", [
    (["apply", "mlp.onnx", "plan.json", "-o", "mlp.onnx"], "is the input"),
    (["apply", "mlp.onnx", "plan.json", "-o", "plan.json", "--force"], "is the input"),
    (["finetune", "mlp.onnx", "--data", "digits.npz", "-o", "mlp.onnx"], "is the input"),
    (["finetune", "mlp.onnx", "--data", "digits.npz", "-o", "digits.npz", "--force"], "is the input"),
    (["score", "mlp.onnx", "-o", "mlp.onnx"], "is the input"),
    (["allocate", "mlp.onnx", "--scores", "scores.json", "--target-sparsity", "0.5", "-o", "scores.json"],
     "is the input"),
], ids=["apply", "apply-plan", "finetune", "finetune-data", "score", "allocate"])
def test_output_equal_to_an_input(work, args, fragment):
    fails_cleanly(work, args, fragment)


OUTPUT_COMMANDS = {
    "score": ["score", "mlp.onnx", "-o", "{o}/s.json"],
    "allocate": ["allocate", "mlp.onnx", "--method", "uniform", "--target-sparsity", "0.5", "-o", "{o}/p.json"],
    "apply": ["apply", "mlp.onnx", "plan.json", "-o", "{o}/pruned.onnx"],
    "finetune": ["finetune", "mlp.onnx", "--data", "digits.npz", "--epochs", "1", "-o", "{o}/tuned.onnx"],
}


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
@pytest.mark.parametrize("folder, fragment", [("missing", "does not exist"), ("unwritable", "writ")])
def test_output_folder_missing_or_unwritable(work, command, folder, fragment):
    if folder == "unwritable":
        if os.geteuid() == 0:  # root writes through permission bits; a pseudo file system refuses even root
            folder = "/proc"
        else:
            (work / "ro").mkdir()
            (work / "ro").chmod(0o500)
            folder = "ro"
    fails_cleanly(work, [a.format(o=folder) for a in OUTPUT_COMMANDS[command]], fragment)


def test_output_path_is_a_directory(work):
    fails_cleanly(work, ["apply", "mlp.onnx", "plan.json", "-o", "out"], "is a directory")


# ---------------------------------------------------------------------------------------------------------
# interrupted writes: a failure in the middle of saving leaves nothing behind


def _broken_save(exc):
    def save(model, path, **kwargs):
        Path(path).write_bytes(b"partial model")  # something was written, then the failure
        raise exc

    return save


@pytest.mark.parametrize("exc, rc, fragment", [
    (OSError(28, "No space left on device"), 1, "No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("command", ["apply", "apply-channel", "finetune"])
def test_interrupted_model_write(work, monkeypatch, command, exc, rc, fragment):
    import onnx_ir

    monkeypatch.setattr(onnx_ir, "save", _broken_save(exc))
    args = {"apply": COMMANDS["apply"], "apply-channel": ["apply", "{m}", "plan_ch.json", "-o", "out/pruned.onnx"],
            "finetune": COMMANDS["finetune"]}[command]
    fails_cleanly(work, [a.format(m="mlp.onnx") for a in args], fragment, rc=rc)


@pytest.mark.parametrize("command", ["score", "allocate"])
def test_interrupted_json_write(work, monkeypatch, command):
    def broken_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("onnxprune.io.os.replace", broken_replace)
    fails_cleanly(work, [a.format(m="mlp.onnx") for a in COMMANDS[command]], "Input/output error", rc=1)


def test_sigterm_during_a_run_cleans_up(work, export, tmp_path):
    """A real signal: SIGTERM while apply writes (slowed down by a hook) exits 143 and leaves nothing."""
    import signal
    import subprocess
    import sys
    import time

    hook = tmp_path / "slow_save.py"
    hook.write_text(
        "import time, onnx_ir\n"
        "_save = onnx_ir.save\n"
        "def save(model, path, **kw):\n"
        "    _save(model, path, **kw)\n"
        "    print('saved', flush=True)\n"
        "    time.sleep(60)\n"
        "onnx_ir.save = save\n"
        "from onnxprune.cli import main\n"
        "main()\n"
    )
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, str(hook), "apply", "mlp.onnx", "plan.json", "-o", "out/pruned.onnx"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "saved"
    assert any(p.name.startswith(".onnxprune-") for p in (work / "out").iterdir())  # mid-write
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip() == "terminated"
    assert snapshot(work) == before


@pytest.mark.parametrize("plan, granularity, fragment", [
    ("plan.json", "channel", "the plan gives weight sparsities, not channels to remove"),
    ("plan_ch.json", "unstructured", "the plan removes whole channels"),
    ("plan_ch.json", "n:m", "the plan removes whole channels"),
])
def test_granularity_that_contradicts_the_plan(work, plan, granularity, fragment):
    """An unstructured plan is not silently applied as channel ratios (4x fewer FLOPs), nor the reverse."""
    line = fails_cleanly(work, ["apply", "mlp.onnx", plan, "--granularity", granularity, "-o", "out/p.onnx"],
                         fragment)
    assert "onnxprune allocate" in line and "--granularity" in line
