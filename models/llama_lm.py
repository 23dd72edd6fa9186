"""A small Llama-architecture decoder trained on real English text, and the exports deployments get of it.

The text is Debian's ``fortunes`` package (/usr/share/games/fortunes: quotations, jokes, poems), split by
entry: every tenth entry is held out. A byte-level BPE tokenizer is trained on the training entries; the
model (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) is trained on them for a few CPU minutes
and saved in Hugging Face format, then exported:

- ``genai_fp32/`` (and ``genai_int4/``): ONNX Runtime GenAI's model builder (GroupQueryAttention with its
  rotary embedding, SkipSimplifiedLayerNormalization, int4 MatMulNBits), a folder with genai_config.json;
- ``optimum/``: torch's exporter with Optimum's names (input_ids, attention_mask, position_ids,
  past_key_values.N.key / value -> logits, present.N.key / value), a folder with config.json.

``heldout.npz`` and ``calib.npz`` hold token sequences (``input_ids``, (sequences, tokens)) of the held-out
and training text; ``train.json`` the held-out perplexity of the model and of a unigram model of the training
tokens (add-one smoothed), the baseline a trained model must be far below.

    python -m models.llama_lm -o build/llm                   # "small": 8 layers, trained ~4 minutes
    python -m models.llama_lm -o build/llm_tiny --size tiny  # tests: 4 layers, seconds
    python -m models.llama_lm -o build/llm_wide --size wide --steps 0 --no-int4   # latency, untrained
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
HELD_OUT_EVERY = 10

SIZES = {  # hidden, layers, heads, kv heads, MLP width, vocabulary, sequence length
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=384, seq=64),
    "small": dict(hidden_size=192, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=1024, seq=128),
    "wide": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=1024, seq=256),
}


def fortunes_entries() -> tuple[list[str], list[str]]:
    """(training entries, held-out entries) of the fortunes files, in file order."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: apt-get install fortunes")
    entries = []
    for path in sorted(FORTUNES.iterdir()):
        if path.is_file() and "." not in path.name:
            text = path.read_text(encoding="utf-8", errors="replace")
            entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    held = [e for i, e in enumerate(entries) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [e for i, e in enumerate(entries) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def train_tokenizer(entries: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(entries, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def token_stream(tokenizer, entries: list[str]) -> np.ndarray:
    """Every entry's tokens, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids = []
    for batch in range(0, len(entries), 512):
        for row in tokenizer(entries[batch:batch + 512])["input_ids"]:
            ids += row + [eos]
    return np.asarray(ids, np.int64)


def sequences(stream: np.ndarray, length: int) -> np.ndarray:
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)


def unigram_perplexity(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Held-out perplexity of next tokens (positions 1..) under add-one smoothed training frequencies."""
    counts = np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held[:, 1:]].mean()))


def build_config(size: str):
    from transformers import LlamaConfig

    spec = {k: v for k, v in SIZES[size].items() if k != "seq"}
    return LlamaConfig(**spec, max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)


def train(model, data: np.ndarray, steps: int, batch: int, lr: float, seed: int = 0, log=print) -> None:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = torch.from_numpy(data[rng.integers(0, len(data), batch)])
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


def perplexity_torch(model, data: np.ndarray, batch: int = 16) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            rows = torch.from_numpy(data[i:i + batch])
            logits = model(input_ids=rows).logits[:, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, rows[:, 1:, None])
            total -= float(logp.sum())
            count += rows[:, 1:].numel()
    return float(np.exp(total / count))


def export_genai(hf_dir: Path, out_dir: Path, precision: str = "fp32") -> Path:
    """ONNX Runtime GenAI's model builder on the Hugging Face folder (CPU execution provider)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(out_dir / "_cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"GenAI builder failed: {done.stderr[-2000:]}")
    import shutil

    shutil.rmtree(out_dir / "_cache", ignore_errors=True)
    return out_dir / "model.onnx"


def export_optimum(hf_dir: Path, out_dir: Path, opset: int = 17) -> Path:
    """torch's exporter with Optimum's input and output names, the KV cache as past / present pairs."""
    import shutil

    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    cfg = model.config
    layers = cfg.num_hidden_layers

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=cfg)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    head = cfg.hidden_size // cfg.num_attention_heads
    batch, new, old = 2, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    mask = torch.ones(batch, old + new, dtype=torch.int64)
    positions = torch.arange(old, old + new).expand(batch, new)
    past = [torch.randn(batch, cfg.num_key_value_heads, old, head) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dynamic = {"input_ids": {0: "batch_size", 1: "sequence_length"},
               "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
               "position_ids": {0: "batch_size", 1: "sequence_length"},
               "logits": {0: "batch_size", 1: "sequence_length"}}
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    dynamic.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithCache(), (ids, mask, positions, *past), str(path), opset_version=opset,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=dynamic, dynamo=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, out_dir / name)
    return path


def build(out: Path, size: str = "small", steps: int | None = None, batch: int = 32, lr: float = 3e-3,
          int4: bool = True, optimum: bool = True, log=print) -> dict:
    """Everything in the module docstring, into ``out``; returns the training report."""
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    spec = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    train_entries, held_entries = fortunes_entries()
    tokenizer = train_tokenizer(train_entries, spec["vocab_size"])
    train_ids = sequences(token_stream(tokenizer, train_entries), spec["seq"])
    held_ids = sequences(token_stream(tokenizer, held_entries), spec["seq"])
    np.savez(out / "heldout.npz", input_ids=held_ids)
    np.savez(out / "calib.npz", input_ids=train_ids[np.random.default_rng(1).permutation(len(train_ids))[:256]])
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config(size))
    steps = {"tiny": 60, "small": 400, "wide": 0}[size] if steps is None else steps
    t0 = time.perf_counter()
    if steps:
        train(model, train_ids, steps, batch, lr, log=log)
    seconds = time.perf_counter() - t0
    model.eval()
    hf = out / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    report = {"size": size, "config": SIZES[size], "params": sum(p.numel() for p in model.parameters()),
              "steps": steps, "batch": batch, "train_seconds": round(seconds, 1),
              "train_tokens": int(train_ids.size), "heldout_tokens": int(held_ids.size),
              "heldout_sequences": len(held_ids)}
    if steps:
        report["heldout_perplexity"] = perplexity_torch(model, held_ids)
        report["unigram_perplexity"] = unigram_perplexity(train_ids, held_ids, spec["vocab_size"])
    export_genai(hf, out / "genai_fp32", "fp32")
    if int4:
        export_genai(hf, out / "genai_int4", "int4")
    if optimum:
        export_optimum(hf, out / "optimum")
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("build/llm"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-int4", action="store_true")
    parser.add_argument("--no-optimum", action="store_true")
    args = parser.parse_args()
    report = build(args.output, args.size, args.steps, args.batch, args.lr, not args.no_int4, not args.no_optimum)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
