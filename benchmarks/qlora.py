"""QLoRA against LoRA on a fixed CPU configuration: the memory of loading the model, and of training it, and the speed.

    python benchmarks/qlora.py                      # both measurements, each run in its own process
    python benchmarks/qlora.py --part load --quantize bnb.nf4   # one run, in this process (prints one JSON line)

The model: `bench-8x512` (benchmarks/bench_config.py: 8 layers, n_embd 512, vocab 32,000; 58M parameters, of which
the Blocks' linear weights are 25M), random weights saved as an fp32 checkpoint folder (out/bench-qlora/base), loaded
the way every script loads it (lit_lora/checkpoint.py's load_model, memory-mapped; with --quantize each Block weight is
read, quantized to NF4 and dropped, one at a time).

Both parts load the checkpoint and read every weight once, as moving the model to a GPU would (a forward pass
alone reads only the embedding rows of its tokens: how much of the memory-mapped file then counts in the
resident memory would depend on the kernel's page cache).
- load: then one forward pass of 256 tokens. The figures are the peak resident memory (RSS, VmHWM) above what
  the process held before loading, and what it still holds after.
- train: LoRA r 8 / alpha 16 / dropout 0.05 on q and v, AdamW, fp32, micro batch 4 x 256 tokens with the first
  half of each sequence masked (as train_throughput.py); tokens/s over the timed steps and the peak RSS above
  the memory held before loading.
LoRA (no --quantize) and QLoRA (bnb.nf4, bnb.nf4-dq) alternate, each in a fresh process, so that a busy machine
slows them alike; the baseline of a QLoRA process is taken after importing bitsandbytes (about 45 MB).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import bench_config, machine_load  # noqa: E402
from lit_lora.checkpoint import load_model, save_checkpoint_dir  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable  # noqa: E402
from lit_lora.model import LLaMA  # noqa: E402
from lit_lora.quantize import load_model_4bit, require_bitsandbytes  # noqa: E402
from lit_lora.report import peak_memory_bytes  # noqa: E402
from lit_lora.tokenizer import Tokenizer  # noqa: E402
from lit_lora.train import loss_sum  # noqa: E402

CHECKPOINT_DIR = ROOT / "out" / "bench-qlora" / "base"
MICRO_BATCH, SEQ_LEN = 4, 256
MODES = (None, "bnb.nf4", "bnb.nf4-dq")


def make_checkpoint() -> Path:
    """The bench-8x512 checkpoint folder, with a small SentencePiece tokenizer (its ids fit the 32,000 vocabulary)."""
    if (CHECKPOINT_DIR / "lit_model.pth").is_file():
        return CHECKPOINT_DIR
    folder = CHECKPOINT_DIR.parent / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    words = ["lora", "quantize", "weights", "memory", "block", "scale", "level", "normal", "float", "four", "bits"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i}" for i in range(400)]
    Tokenizer.train(corpus, vocab_size=300, model_prefix=folder / "tokenizer")
    torch.manual_seed(0)
    config = bench_config()
    save_checkpoint_dir(CHECKPOINT_DIR, LLaMA(config).state_dict(), config, Tokenizer(folder / "tokenizer.model").files)
    return CHECKPOINT_DIR


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(part: str, quantize: Optional[str], steps: int, warmup: int) -> dict:
    """One run in this process: `part` is load or train (module docstring)."""
    torch.manual_seed(0)
    if quantize is not None:
        require_bitsandbytes()  # imported before the baseline: a fixed cost, like torch's
    baseline = peak_memory_bytes()
    start = time.perf_counter()
    model = load_model(CHECKPOINT_DIR) if quantize is None else load_model_4bit(CHECKPOINT_DIR, quantize)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        for tensor in model.state_dict().values():  # read every weight once, as moving the model to a GPU would
            tensor.sum()
    tokens = torch.randint(0, 300, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    if part == "load":
        last = torch.zeros(1, SEQ_LEN, dtype=torch.bool)
        last[0, -1] = True
        with torch.no_grad():
            model.eval()(tokens[:1], logits_at=last)  # one forward pass; logits of the last position only
        return {"part": part, "quantize": quantize, "load_s": load_s, "peak_mb": (peak_memory_bytes() - baseline) / 1e6,
                "held_mb": (resident_bytes() - baseline) / 1e6}
    apply_lora(model, r=8, alpha=16, dropout=0.05, targets=("q", "v"))
    mark_only_lora_as_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = tokens.clone()
    labels[:, : SEQ_LEN // 2] = -100  # the prompt carries no loss
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        loss = loss_sum(model, tokens, labels) / (labels[:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return {"part": part, "quantize": quantize, "tokens_per_s": steps * MICRO_BATCH * SEQ_LEN / elapsed,
            "step_s": elapsed / steps, "peak_mb": (peak_memory_bytes() - baseline) / 1e6, "loss": float(loss)}


def main(part: Optional[Literal["load", "train"]] = None, quantize: Optional[str] = None, rounds: int = 3,
         steps: int = 5, warmup: int = 2) -> None:
    """Measure loading and training bench-8x512 with and without 4-bit Blocks.

    Args:
        part: Measure only this part (load or train) with --quantize, in this process (prints one JSON line).
        quantize: With --part: null (LoRA), bnb.nf4 or bnb.nf4-dq.
        rounds: Alternating runs of each mode (the best of each is reported: the least disturbed by other work).
        steps: Timed optimizer steps per training run.
        warmup: Untimed steps first.
    """
    make_checkpoint()
    if part is not None:
        print(json.dumps(measure(part, quantize, steps, warmup)))
        return
    require_bitsandbytes("benchmarks/qlora.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back to the system (finetune/compare.py)
    results = {}
    print(machine_load(), flush=True)
    for part_ in ("load", "train"):
        for round_ in range(rounds):
            for mode in MODES:
                command = [sys.executable, __file__, "--part", part_, "--steps", str(steps), "--warmup", str(warmup)]
                command += ["--quantize", mode] if mode else []
                out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.setdefault((part_, mode), []).append(r)
                figures = (f"peak +{r['peak_mb']:.0f} MB, still held +{r['held_mb']:.0f} MB, {r['load_s']:.2f} s"
                           if part_ == "load" else f"{r['tokens_per_s']:.0f} tokens/s, peak +{r['peak_mb']:.0f} MB")
                print(f"{part_} round {round_ + 1}: {mode or 'unquantized':11s} {figures}", flush=True)
    print(f"\nbench-8x512 (fp32 checkpoint, {torch.get_num_threads()} threads), best of {rounds}:")
    for mode in MODES:
        load = min(results[("load", mode)], key=lambda r: r["peak_mb"])
        train = max(results[("train", mode)], key=lambda r: r["tokens_per_s"])
        train_peak = min(r["peak_mb"] for r in results[("train", mode)])
        print(f"  {mode or 'unquantized (LoRA)':20s} load: peak +{load['peak_mb']:.0f} MB, held +{load['held_mb']:.0f} MB"
              f" | train: {train['tokens_per_s']:.0f} tokens/s, peak +{train_peak:.0f} MB")
    lora_train = max(r["tokens_per_s"] for r in results[("train", None)])
    lora_peak = min(r["peak_mb"] for r in results[("train", None)])
    lora_load = min(r["peak_mb"] for r in results[("load", None)])
    for mode in MODES[1:]:
        print(f"  {mode} / LoRA: {min(r['peak_mb'] for r in results[('load', mode)]) / lora_load:.2f}x the loading peak, "
              f"{min(r['peak_mb'] for r in results[('train', mode)]) / lora_peak:.2f}x the training peak, "
              f"{max(r['tokens_per_s'] for r in results[('train', mode)]) / lora_train:.2f}x the tokens/s")


if __name__ == "__main__":
    cli(main)
