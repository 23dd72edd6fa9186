"""Model folders: a runtime's configuration beside the model, kept true when pruning changes the model.

ONNX Runtime GenAI runs a folder: ``genai_config.json`` (the decoder's file, layer count, head counts, the KV
cache's name templates), the model and its external data, the tokenizer files. Optimum's exports are folders
too, with a Hugging Face ``config.json``. A pruned model written to another folder gets the other files
copied beside it and the configuration rewritten: ``num_hidden_layers`` the cache layers left (GenAI
allocates one past/present pair per layer), head counts as the attention nodes now have them, and GenAI's
decoder file name the one written. The input folder is never changed: a model written into it gets no
configuration (a notice says so).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from onnxprune.errors import InputError

__all__ = ["FolderResult", "check_folder", "write_folder"]

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


@dataclass
class FolderResult:
    config: str | None  # the configuration file written (GenAI's or Hugging Face's), None when none
    copied: list[str]  # other files copied beside the model
    notice: str | None = None

    def to_dict(self) -> dict:
        return {"config": self.config, "copied": self.copied, "notice": self.notice}


def write_folder(model: ir.Model, input_path: Path, output_path: Path, layers: int | None) -> FolderResult | None:
    """Copy the runtime files of ``input_path``'s folder beside ``output_path`` with the configuration
    updated for ``model`` (the pruned model; ``layers``: its KV-cache layers). None when the input is not in a
    model folder of a runtime onnxprune knows."""
    src, dst = input_path.parent, output_path.parent
    kind = _folder_kind(src, input_path.name)
    if kind is None:
        return None
    if src.resolve() == dst.resolve():
        return FolderResult(None, [], f"{kind} not rewritten: the model was written into the input's folder, "
                                      "whose configuration describes the input; write to another folder")
    model_files = {input_path.name, output_path.name, output_path.name + ".data"} | _external_files(input_path)
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in model_files and item.name != kind and item.suffix != ".onnx":
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    config = json.loads((src / kind).read_text())
    heads = _attention_heads(model)
    if kind == GENAI_CONFIG:
        decoder = config["model"]["decoder"]
        decoder["filename"] = output_path.name
        if layers is not None:
            decoder["num_hidden_layers"] = layers
        if heads:
            decoder["num_attention_heads"], decoder["num_key_value_heads"] = heads
    else:
        if layers is not None:
            config["num_hidden_layers"] = layers
        if heads:
            config["num_attention_heads"], config["num_key_value_heads"] = heads
    (dst / kind).write_text(json.dumps(config, indent=4) + "\n")
    return FolderResult(kind, copied)


def check_folder(model: ir.Model, input_path: Path) -> None:
    """Refuse (InputError) a pruned model that its runtime's folder configuration cannot describe: GenAI holds
    one query-head and one KV-head count for every layer."""
    if _folder_kind(input_path.parent, input_path.name) != GENAI_CONFIG:
        return
    counts = {(n.attributes.get_int("num_heads", 0), n.attributes.get_int("kv_num_heads", 0))
              for n in model.graph if n.op_type == "GroupQueryAttention"}
    if len(counts) > 1:
        raise InputError("ONNX Runtime GenAI's genai_config.json holds one KV-head count for every layer, and "
                         f"the plan leaves layers with different counts ({', '.join(f'{h}/{k}' for h, k in sorted(counts))}"
                         " query/KV heads); plan the same number of KV groups in every layer (--method uniform)")


def _folder_kind(folder: Path, model_name: str) -> str | None:
    genai = folder / GENAI_CONFIG
    if genai.is_file():
        try:
            if json.loads(genai.read_text())["model"]["decoder"]["filename"] == model_name:
                return GENAI_CONFIG
        except (KeyError, TypeError, ValueError):
            return None
    hf = folder / HF_CONFIG
    if hf.is_file():
        try:
            return HF_CONFIG if "num_hidden_layers" in json.loads(hf.read_text()) else None
        except ValueError:
            return None
    return None


def _external_files(path: Path) -> set[str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}


def _attention_heads(model: ir.Model) -> tuple[int, int] | None:
    """(query heads, KV heads) of the model's GroupQueryAttention nodes, when they all agree (GenAI's config
    holds one count for every layer)."""
    counts = {(n.attributes.get_int("num_heads", 0), n.attributes.get_int("kv_num_heads", 0))
              for n in model.graph if n.op_type == "GroupQueryAttention"}
    return counts.pop() if len(counts) == 1 else None
