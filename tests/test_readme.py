"""The README's Python example runs as written (on the files make demo produces)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example(export, digits_npz, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    demo = tmp_path / "build" / "demo"
    demo.mkdir(parents=True)
    shutil.copy(export("cnn"), demo / "cnn.onnx")
    shutil.copy(digits_npz, demo / "digits_test.npz")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "top-1" in printed and "samples/s" in printed
