"""DPO with LoRA on a real model: lit-lora (finetune/dpo.py) against TRL's DPOTrainer with peft, and against a
supervised LoRA step (finetune/lora.py) on the same sequences, each run in a process of its own.

    python checkpoints/fetch_smollm2_gguf.py      # the model: SmolLM2-135M-Instruct (see howto/chat.md)
    pip install trl                               # the peer (skipped, with a line, when it is not installed)
    python benchmarks/dpo_vs_trl.py

The data are howto/dpo.md's pairs (howto/dpo_pairs.py), in the model's chat template. The same settings for all:
LoRA r 8, alpha 16, no dropout, on query and value; beta 0.1; fp32; micro batch `micro` pairs, `batch` pairs a step;
AdamW at lr 5e-4, warmup 2 steps then cosine; no gradient clipping; `steps` steps, those from `first_timed_step` on
timed; no evaluation or saving within the run. TRL is told what lit-lora does: fp32 (its default is bf16) and no
gradient checkpointing (its default is on); its reference is the peft model with the adapter disabled, as
lit-lora's is the model with LoRA off. The supervised run trains on the same sequences: each pair's prompt with its
chosen answer and with its rejected one, as two examples, `2 * micro` a micro batch and `2 * batch` a step.

Printed: real tokens/s (tokens that are not padding: prompt and answer, both answers of a pair), the step time and
the peak RSS of each process (VmHWM, read at its last step), median over `repeats` alternating runs, and the ratios
the issue asks for: peak memory of a DPO step against the supervised step, and tokens/s against TRL's.
What differs by design: lit-lora packs each micro batch (no padding computed) and computes logits only at the answer
tokens; TRL pads each batch to its longest pair and computes logits at every position.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import machine_load, smollm2_checkpoint  # noqa: E402
from benchmarks.train_vs_litgpt import log_rows, vm_hwm  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.report import format_bytes  # noqa: E402

OUT = ROOT / "out/bench/dpo_vs_trl"
HF_DIR = ROOT / "out/bench/smollm2-hf"
LR, WARMUP, SEQ_LEN = 5e-4, 2, 256


def prepare(checkpoint_dir: Path) -> list[dict]:
    """The pairs as records, prepared as pairs (DPO) and as examples (the supervised run on the same sequences)."""
    from howto.dpo_pairs import pairs

    records = pairs()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[key]}]}
                for r in records for key in ("chosen", "rejected")]
    (OUT / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    common = ["--checkpoint_dir", str(checkpoint_dir), "--prompt_style", "chat_template", "--test_split_size", "0",
              "--max_seq_length", str(SEQ_LEN)]
    for script, data, destination in (("preference.py", "pairs.jsonl", "pairs"), ("json_data.py", "examples.jsonl",
                                                                                    "examples")):
        subprocess.run([sys.executable, str(ROOT / "prepare_data" / script), "--data_file", str(OUT / data),
                        "--destination_path", str(OUT / destination), *common], check=True, capture_output=True)
    return records


def lit_command(kind: str, checkpoint_dir: Path, out_dir: Path, micro: int, batch: int, steps: int) -> list[str]:
    factor = 1 if kind == "dpo" else 2  # the supervised run: both sequences of each pair as examples
    return [sys.executable, str(ROOT / "finetune" / f"{'dpo' if kind == 'dpo' else 'lora'}.py"),
            "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(OUT / ("pairs" if kind == "dpo" else "examples")),
            "--out_dir", str(out_dir), "--precision", "32-true", "--lora_r", "8", "--lora_alpha", "16",
            "--lora_dropout", "0", "--lora_targets", "[q,v]", "--micro_batch_size", str(factor * micro),
            "--global_batch_size", str(factor * batch), "--max_steps", str(steps), "--warmup_steps", str(WARMUP),
            "--learning_rate", str(LR), "--grad_clip", "0", "--eval_interval", str(steps + 1),
            "--save_interval", str(steps + 1), "--eval_examples", "1", "--eval_max_new_tokens", "0",
            "--log_interval", "1", "--overwrite", "true"]


def run(name: str, command: list[str], out_dir: Path, steps: int, first_timed_step: int) -> dict:
    """One run in its own process: per-step times and real tokens, and the peak RSS at its last step."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a log of an earlier run must not be read as this one's
    out_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    peak, lines = 0, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"step {steps}/") or line.startswith("trl step"):
                peak = vm_hwm(process.pid)
    (out_dir / "output.log").write_text("".join(lines))
    if process.returncode != 0:
        sys.exit(f"error: {name} failed (exit code {process.returncode}):\n{''.join(lines[-15:])}")
    if name == "TRL":  # the worker's own JSON line: per-step seconds and real tokens
        steps_seen = json.loads(next(line for line in lines if line.startswith("{\"steps\"")))["steps"]
    else:
        steps_seen = [(float(r["step_time_s"]), int(r["step_tokens"]))
                      for r in log_rows(out_dir, "logs/version_*/metrics.csv", "step_time_s")]
    timed = steps_seen[first_timed_step - 1:]
    seconds, tokens = sum(t for t, _ in timed), sum(n for _, n in timed)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(timed), "peak_rss": peak}


def trl_worker(micro: int, batch: int, steps: int) -> None:
    """TRL's DPOTrainer with a peft LoRA on the Hugging Face export of the same weights, in this process; prints
    one JSON line with each step's seconds and real tokens (attention mask), then 'trl step N' at the end."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(1337)
    records = [json.loads(line) for line in (OUT / "pairs.jsonl").read_text().splitlines()]
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(HF_DIR)
    config = DPOConfig(output_dir=str(OUT / "trl"), per_device_train_batch_size=micro,
                       gradient_accumulation_steps=batch // micro, learning_rate=LR, lr_scheduler_type="cosine",
                       warmup_steps=WARMUP, max_steps=steps, max_grad_norm=0.0, beta=0.1, max_length=SEQ_LEN,
                       bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                       eval_strategy="no", report_to=[], use_cpu=True, seed=1337, dataloader_num_workers=0,
                       disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(conversational),
                         processing_class=tokenizer, peft_config=lora)
    batch_tokens, step_seconds = [], []
    collate = trainer.data_collator

    def counting(examples):
        collated = collate(examples)
        batch_tokens.append(int(collated["attention_mask"].sum()))
        return collated

    trainer.data_collator = counting

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    trainer.train()
    accumulation = batch // micro
    tokens = [sum(batch_tokens[i * accumulation:(i + 1) * accumulation]) for i in range(len(step_seconds))]
    print(json.dumps({"steps": list(zip(step_seconds, tokens))}))
    print(f"trl step {len(step_seconds)}", flush=True)


def main(checkpoint_dir: Path = ROOT / "checkpoints/smollm2", micro: int = 4, batch: int = 8, steps: int = 6,
         first_timed_step: int = 2, repeats: int = 2, worker: bool = False) -> dict:
    """Run and print the comparison.

    Args:
        checkpoint_dir: lit-lora's SmolLM2-135M-Instruct (converted from the fetched GGUF when absent).
        micro: Pairs per micro batch.
        batch: Pairs per optimizer step.
        steps: Optimizer steps per run.
        first_timed_step: The first step timed (earlier ones warm up).
        repeats: Runs of each, alternating.
        worker: Internal: run TRL's trainer in this process.
    """
    if worker:
        return trl_worker(micro, batch, steps)
    checkpoint_dir = smollm2_checkpoint(checkpoint_dir)
    prepare(checkpoint_dir)
    try:
        import trl  # noqa: F401

        has_trl = True
    except ImportError:
        has_trl = False
        print("TRL is not installed (pip install trl): its DPOTrainer is skipped")
    if has_trl and not (HF_DIR / "model.safetensors").is_file():
        from lit_lora.convert.hf import export_hf_checkpoint

        export_hf_checkpoint(checkpoint_dir, HF_DIR)
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {machine_load()}; SmolLM2-135M-Instruct, {batch} pairs a step in micro "
          f"batches of {micro}, {steps} steps, steps {first_timed_step}-{steps} timed, {repeats} alternating runs")
    runs = {"lit-lora DPO": [], "lit-lora supervised LoRA": [], **({"TRL": []} if has_trl else {})}
    for repeat in range(repeats):
        for name in runs:
            out_dir = OUT / f"{name.replace(' ', '-')}-{repeat}"
            if name == "TRL":
                command = [sys.executable, __file__, "--worker", "true", "--micro", str(micro), "--batch", str(batch),
                           "--steps", str(steps)]
            else:
                command = lit_command("dpo" if "DPO" in name else "sft", checkpoint_dir, out_dir, micro, batch, steps)
            runs[name].append(run(name, command, out_dir, steps, first_timed_step))
            print(f"  {name}, run {repeat + 1}: {runs[name][-1]['tokens_per_s']:,.0f} tokens/s, "
                  f"{runs[name][-1]['step_s']:.2f} s a step, peak RSS {format_bytes(runs[name][-1]['peak_rss'])}", flush=True)
    median = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
              for name, results in runs.items()}
    print("\n| run | real tokens/s | s a step | peak RSS |\n|---|---:|---:|---:|")
    for name, m in median.items():
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {m['step_s']:.2f} | {format_bytes(m['peak_rss'])} |")
    dpo, sft = median["lit-lora DPO"], median["lit-lora supervised LoRA"]
    print(f"\nPeak memory, DPO step / supervised LoRA step on the same sequences: "
          f"{dpo['peak_rss'] / sft['peak_rss']:.2f}x (target <= 1.15x)")
    if has_trl:
        print(f"Tokens/s, lit-lora DPO / TRL DPOTrainer + peft: {dpo['tokens_per_s'] / median['TRL']['tokens_per_s']:.2f}x "
              f"(target >= 1.2x); peak memory {dpo['peak_rss'] / median['TRL']['peak_rss']:.2f}x TRL's")
    return median


if __name__ == "__main__":
    cli(main)
