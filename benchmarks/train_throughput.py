"""LoRA training throughput on a fixed CPU configuration, against Hugging Face LlamaForCausalLM + peft.

    python benchmarks/train_throughput.py            # all, alternating, each in its own process
    python benchmarks/train_throughput.py --impl lit # one implementation only

The configuration: `bench-8x512` (benchmarks/bench_config.py: 8 layers, n_embd 512, 8 heads, vocab 32000), a micro
batch of 4 examples of 256, 220, 190 and 130 tokens (as unequal as GSM8K's in Alpaca format: padded to the longest,
22% of the positions would be padding), fp32, LoRA r 8 / alpha 16 / dropout 0.05 on q and v, AdamW. All get the same
weights and examples: instruction data with the prompt masked, here the first half of every example (in Alpaca-style
data about half the tokens carry loss: 50% for GSM8K prepared with prepare_data/). lit-lora runs them as the training
loop does by default, packed in one row (`lit`), and right-padded (`lit-padded`, --packing false); Hugging Face +
peft right-padded with an attention mask, as its data collators give them. One step is forward, loss, backward and
optimizer step. tokens/s counts real tokens; the FLOP/s of lit-lora's steps (lit_lora/flops.py, real tokens only)
is printed against a matrix product's speed measured in the same process. Each implementation runs in its own process so that
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
from lit_lora.data import collate, pack  # noqa: E402
from lit_lora.flops import example_flops, matmul_peak_flops  # noqa: E402
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable  # noqa: E402
from lit_lora.memory import TrainingSetup  # noqa: E402
from lit_lora.model import Config, LLaMA  # noqa: E402
from lit_lora.train import loss_sum  # noqa: E402

LENGTHS = (256, 220, 190, 130)
IMPLS = ("lit", "lit-padded", "hf")
NAMES = {"lit": "lit-lora (packed)", "lit-padded": "lit-lora (padded)", "hf": "HF + peft"}


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

    def loss_fn(input_ids, labels, lengths):  # the training loop's loss: logits only where a label is
        return loss_sum(model, input_ids, labels, lengths) / (labels[:, 1:] != -100).sum()

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

    def loss_fn(input_ids, labels, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    return model, loss_fn


def measure(impl: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = bench_config()
    state_dict = LLaMA(config).state_dict()  # the same random weights for both (seeded)
    model, loss_fn = (build_hf if impl == "hf" else build_lit)(config, state_dict)
    del state_dict
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator, examples = torch.Generator().manual_seed(1), []
    for n in LENGTHS:
        input_ids = torch.randint(0, config.vocab_size, (n,), generator=generator)
        labels = input_ids.clone()
        labels[: n // 2] = -100  # the prompt carries no loss
        examples.append({"input_ids": input_ids, "labels": labels})
    if impl == "lit":
        batch = pack(examples, config.block_size)
    else:
        input_ids, labels = collate(examples, config.block_size)
        mask = (torch.arange(input_ids.size(1)) < torch.tensor(LENGTHS)[:, None]).long()  # 1 on real tokens
        batch = (input_ids, labels, mask if impl == "hf" else None)
    baseline = PeakRSS.current()
    with PeakRSS() as rss:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            loss = loss_fn(*batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    setup = TrainingSetup(method="lora", precision="32-true", lora_r=8, lora_targets=("q", "v"))
    flops = sum(example_flops(config, setup, n, (e["labels"][1:] != -100).sum().item()) for n, e in zip(LENGTHS, examples))
    return {"impl": impl, "tokens_per_s": steps * sum(LENGTHS) / elapsed, "step_s": elapsed / steps,
            "peak_mb": (rss.peak - baseline) / 1e6, "trainable": trainable, "loss": float(loss),
            "flops_per_s": steps * flops / elapsed, "peak_flops_per_s": matmul_peak_flops(torch.float32, torch.device("cpu"))}


def main(impl: Optional[Literal["lit", "lit-padded", "hf"]] = None, rounds: int = 3, steps: int = 5,
         warmup: int = 2) -> None:
    """Measure LoRA training steps; with no --impl, compare lit-lora (packed and padded) and Hugging Face + peft.

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
        impls = IMPLS
    except ImportError:
        print("transformers and peft are not installed (pip install -e '.[test]'): measuring lit-lora only")
        impls = IMPLS[:2]
    runs = {name: [] for name in impls}
    print(machine_load(), flush=True)
    for round_ in range(rounds):
        for name in impls:
            out = subprocess.run([sys.executable, __file__, "--impl", name, "--steps", str(steps), "--warmup", str(warmup)],
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            r = runs[name][-1]
            print(f"round {round_ + 1}: {name:10s} {r['tokens_per_s']:8.0f} tokens/s  {r['step_s']:.3f} s/step  "
                  f"peak +{r['peak_mb']:.0f} MB  (trainable {r['trainable']:,})", flush=True)
    best = {name: max(results, key=lambda r: r["tokens_per_s"]) for name, results in runs.items()}
    peak = {name: min(r["peak_mb"] for r in results) for name, results in runs.items()}
    print(f"\nLoRA training, bench-8x512, a micro batch of {len(LENGTHS)} examples ({sum(LENGTHS)} real tokens), fp32, "
          f"{torch.get_num_threads()} threads (best of {rounds}):")
    for name, results in runs.items():
        warning = spread_warning(f"{name}'s tokens/s", [1 / r["tokens_per_s"] for r in results])
        if warning:
            print(warning)
    for name in impls:
        print(f"  {NAMES[name]:18s} {best[name]['tokens_per_s']:8.0f} tokens/s   "
              f"peak memory during the steps +{peak[name]:.0f} MB")
    lit = best["lit"]
    print(f"  lit-lora (packed): {lit['flops_per_s'] / 1e9:.1f} GFLOP/s of real tokens, "
          f"{100 * lit['flops_per_s'] / lit['peak_flops_per_s']:.0f}% of the {lit['peak_flops_per_s'] / 1e9:.0f} GFLOP/s "
          "of an fp32 matrix product measured in its process (target >= 75%)")
    print(f"  packed / padded: {lit['tokens_per_s'] / best['lit-padded']['tokens_per_s']:.2f}x tokens/s")
    if "hf" in best:
        print(f"  ratio lit-lora (packed) / HF + peft: {lit['tokens_per_s'] / best['hf']['tokens_per_s']:.2f}x "
              f"tokens/s (target >= 2x), {peak['lit'] / peak['hf']:.2f}x peak memory (target <= 1.0x)")


if __name__ == "__main__":
    cli(main)
