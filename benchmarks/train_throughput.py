"""LoRA training throughput on a fixed CPU configuration, against Hugging Face LlamaForCausalLM + peft.

    python benchmarks/train_throughput.py            # both, alternating, each in its own process
    python benchmarks/train_throughput.py --impl lit # one implementation only

The configuration: `bench-8x512` (benchmarks/bench_config.py: 8 layers, n_embd 512, 8 heads, vocab 32000), micro batch 4,
sequence 256, fp32, LoRA r 8 / alpha 16 / dropout 0.05 on q and v, AdamW. Both models get the same weights
and the same batch: instruction data with the prompt masked, here the first half of every sequence (in
Alpaca-style data about half the tokens carry loss: 50% for GSM8K prepared with prepare_data/).
One step is forward, loss, backward and optimizer step. Each implementation runs in its own process so that
its peak memory is its own: the figure is the peak resident memory during the steps, above the memory held
once the model was built. Runs alternate (lit, hf, lit, hf, ...) so that a noisy machine hurts both alike.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import bench_config, machine_load, spread_warning  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable  # noqa: E402
from lit_lora.model import Config, LLaMA  # noqa: E402
from lit_lora.train import loss_sum  # noqa: E402

MICRO_BATCH, SEQ_LEN = 4, 256


class PeakRSS:
    """Samples this process's resident memory every few milliseconds (CPU allocations are not tracked by torch)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.current())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_lit(config: Config, state_dict: dict):
    model = LLaMA(config)
    model.load_state_dict(state_dict)
    apply_lora(model, r=8, alpha=16, dropout=0.05, targets=("q", "v"))
    mark_only_lora_as_trainable(model)

    def loss_fn(input_ids, labels):  # the training loop's loss: logits only where a label is
        return loss_sum(model, input_ids, labels) / (labels[:, 1:] != -100).sum()

    return model, loss_fn


def build_hf(config: Config, state_dict: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_lora.convert.hf import config_to_hf, lit_to_hf_name

    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k not in ("architectures",)})
    hf_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_config)
    model.load_state_dict({lit_to_hf_name(k): v for k, v in state_dict.items()})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    return model, loss_fn


def measure(impl: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = bench_config()
    state_dict = LLaMA(config).state_dict()  # the same random weights for both (seeded)
    model, loss_fn = (build_lit if impl == "lit" else build_hf)(config, state_dict)
    del state_dict
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(0, config.vocab_size, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, : SEQ_LEN // 2] = -100  # the prompt carries no loss
    baseline = PeakRSS.current()
    with PeakRSS() as rss:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            loss = loss_fn(input_ids, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"impl": impl, "tokens_per_s": steps * MICRO_BATCH * SEQ_LEN / elapsed, "step_s": elapsed / steps,
            "peak_mb": (rss.peak - baseline) / 1e6, "trainable": trainable, "loss": float(loss)}


def main(impl: Optional[Literal["lit", "hf"]] = None, rounds: int = 3, steps: int = 5, warmup: int = 2) -> None:
    """Measure LoRA training steps; with no --impl, compare lit-lora and Hugging Face + peft.

    Args:
        impl: Measure only this implementation, in this process (prints one JSON line).
        rounds: Alternating runs of each implementation (the best run of each is reported).
        steps: Timed optimizer steps per run.
        warmup: Untimed steps first.
    """
    if impl is not None:
        print(json.dumps(measure(impl, steps, warmup)))
        return
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        impls = ("lit", "hf")
    except ImportError:
        print("transformers and peft are not installed (pip install -e '.[test]'): measuring lit-lora only")
        impls = ("lit",)
    runs = {name: [] for name in impls}
    print(machine_load(), flush=True)
    for round_ in range(rounds):
        for name in impls:
            out = subprocess.run([sys.executable, __file__, "--impl", name, "--steps", str(steps), "--warmup", str(warmup)],
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            r = runs[name][-1]
            print(f"round {round_ + 1}: {name:3s} {r['tokens_per_s']:8.0f} tokens/s  {r['step_s']:.3f} s/step  "
                  f"peak +{r['peak_mb']:.0f} MB  (trainable {r['trainable']:,})", flush=True)
    best = {name: max(results, key=lambda r: r["tokens_per_s"]) for name, results in runs.items()}
    peak = {name: min(r["peak_mb"] for r in results) for name, results in runs.items()}
    print(f"\nLoRA training, bench-8x512, micro batch {MICRO_BATCH} x {SEQ_LEN} tokens, fp32, "
          f"{torch.get_num_threads()} threads (best of {rounds}):")
    for name, results in runs.items():
        warning = spread_warning(f"{name}'s tokens/s", [1 / r["tokens_per_s"] for r in results])
        if warning:
            print(warning)
    for name in impls:
        print(f"  {'lit-lora' if name == 'lit' else 'HF + peft':10s} {best[name]['tokens_per_s']:8.0f} tokens/s   "
              f"peak memory during the steps +{peak[name]:.0f} MB")
    if "hf" in best:
        print(f"  ratio lit-lora / HF + peft: {best['lit']['tokens_per_s'] / best['hf']['tokens_per_s']:.2f}x "
              f"tokens/s (target >= 1.2x), {peak['lit'] / peak['hf']:.2f}x peak memory (target <= 1.0x)")


if __name__ == "__main__":
    cli(main)
