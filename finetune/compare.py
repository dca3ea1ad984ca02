"""Compare LoRA, QLoRA, LLaMA-Adapter and full finetuning on the same model and data: memory, time, quality.

    python finetune/compare.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca
    python finetune/compare.py --estimate_only true --model_name 7B --precision bf16-true --methods [lora,qlora,adapter,full]

Each method runs its own script (finetune/lora.py, adapter.py, full.py; QLoRA is finetune/lora.py --quantize)
with the same checkpoint, data, precision, batch sizes, seed and number of optimizer steps, and its own learning
rate (the script's default unless given). Each runs in a fresh Python process, so the peak memory it reports is
its own: CUDA's max_memory_allocated on a GPU, the peak resident set size (RSS) on a CPU, where it includes what
Python, torch and Lightning hold before training starts (reported as the baseline). Before anything runs, the
memory each method should need is worked out by lit_lora/memory.py and printed beside what was measured.

Then the base model and each finetune are evaluated on the same items, each by its evaluate script
(evaluate/base.py, lora.py, adapter.py, full.py, run in this process: no memory is measured there): the loss and
perplexity over the whole test split, and with --tasks the accuracy on lm-eval-harness tasks
(pip install -e ".[eval]").

Written to out_dir: <method>/ (each run's weights, logs and evaluation.json), base/evaluation.json, results.csv,
results.md, and results.png
when matplotlib is installed (pip install -e ".[plot]"). See howto/compare.md.
"""

import csv
import importlib
import io
import json
import os
import runpy
import signal
import statistics
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the finetune/ scripts are imported as modules

from finetune.adapter import AdapterArgs  # noqa: E402
from finetune.full import FullArgs  # noqa: E402
from finetune.lora import LoRAArgs  # noqa: E402
from lit_lora.checkpoint import check_checkpoint_dir, read_config  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.data import load_prepared  # noqa: E402
from lit_lora.devices import default_precision  # noqa: E402
from lit_lora.files import atomic_write  # noqa: E402
from lit_lora.flops import step_flops  # noqa: E402
from lit_lora.memory import (  # noqa: E402
    METHOD_HYPERPARAMETERS,
    MemoryEstimate,
    TrainingSetup,
    estimate_memory,
    format_estimates,
)
from lit_lora.model import Config  # noqa: E402
from lit_lora.quantize import require_bitsandbytes  # noqa: E402
from lit_lora.report import format_bytes, peak_memory_bytes  # noqa: E402

Method = Literal["lora", "qlora", "adapter", "full"]
SCRIPTS = {"lora": "lora", "qlora": "lora", "adapter": "adapter", "full": "full"}  # QLoRA: finetune/lora.py --quantize
METHOD_ARGS = {"lora": LoRAArgs, "qlora": LoRAArgs, "adapter": AdapterArgs, "full": FullArgs}
NAMES = {"lora": "LoRA", "qlora": "QLoRA", "adapter": "LLaMA-Adapter", "full": "Full finetuning",
         "base": "Base model"}


@dataclass
class CompareArgs:
    """Run LoRA, QLoRA, LLaMA-Adapter and full finetuning for the same steps and compare memory, time and loss.

    Args:
        checkpoint_dir: The base model's folder (lit_model.pth, model_config.json, tokenizer.model).
        data_dir: Prepared data (train.pt, test.pt) made by a prepare_data/ script with this model's tokenizer.
        out_dir: Each method's run goes to out_dir/<method>/; the results to out_dir/results.{csv,md,png}.
        methods: The methods to run, in this order: any of lora, qlora (LoRA on a 4-bit base: needs
            pip install -e '.[quantize]'), adapter, full.
        max_steps: Optimizer steps of every method.
        micro_batch_size: Examples per forward/backward pass.
        global_batch_size: Examples per optimizer step (gradient accumulation makes up the rest).
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed; default bf16-true on a GPU that supports it, else
            32-true (with --estimate_only, bf16-true: the estimate is for a GPU).
        max_seq_length: Truncate examples to this many tokens (default: as prepared).
        lora_learning_rate: LoRA's and QLoRA's peak learning rate (default: finetune/lora.py's).
        adapter_learning_rate: LLaMA-Adapter's peak learning rate (default: finetune/adapter.py's).
        full_learning_rate: Full finetuning's peak learning rate (default: finetune/full.py's).
        warmup_steps: Warmup of every method in optimizer steps (default: each script's own).
        eval_examples: The validation loss after the run is computed on this many examples of test.pt.
        seed: Seeds each run (the same data order for every method).
        estimate_only: Only print the predicted memory of each method on a GPU (lit_lora/memory.py) and stop.
        model_name: With --estimate_only: a Config preset (e.g. 7B) instead of checkpoint_dir's model_config.json.
        seq_length: With --estimate_only: the tokens per example to estimate for (default: the data's longest, else 256).
        quantize: QLoRA's 4-bit format: bnb.nf4-dq (NF4 with double quantization, as the QLoRA paper) or bnb.nf4.
        overwrite: Run again in an out_dir whose method folders hold an earlier comparison's runs (they are replaced).
        evaluate: After the runs, evaluate the base model and each finetune on the whole test split (and --tasks).
        tasks: With --evaluate: lm-eval-harness tasks, comma-separated, whose accuracy joins the quality table
            (evaluate/*.py --tasks); null: the test split only.
        include_path: A folder of your own task YAML files for --tasks.
        limit: At most this many examples per task (null: all).
    """

    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf")
    data_dir: Path = Path("data/alpaca")
    out_dir: Path = Path("out/compare")
    methods: tuple[Method, ...] = ("lora", "adapter", "full")
    max_steps: int = 20
    micro_batch_size: int = 4
    global_batch_size: int = 16
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None
    max_seq_length: Optional[int] = None
    lora_learning_rate: Optional[float] = None
    adapter_learning_rate: Optional[float] = None
    full_learning_rate: Optional[float] = None
    warmup_steps: Optional[int] = None
    eval_examples: int = 100
    seed: int = 1337
    estimate_only: bool = False
    model_name: Optional[str] = None
    seq_length: Optional[int] = None
    quantize: Literal["bnb.nf4", "bnb.nf4-dq"] = "bnb.nf4-dq"
    overwrite: bool = False
    evaluate: bool = True
    tasks: Optional[str] = None
    include_path: Optional[Path] = None
    limit: Optional[float] = None


def main(args: CompareArgs) -> dict:
    """Predict, run and compare. Returns {"estimates": {method: MemoryEstimate}, "results": [row per method]}."""
    if not args.methods:
        raise ValueError("--methods is empty: give one or more of lora, qlora, adapter, full, e.g. --methods [lora,full]")
    if args.global_batch_size % args.micro_batch_size:
        raise ValueError(f"--global_batch_size ({args.global_batch_size}) must be a multiple of "
                         f"--micro_batch_size ({args.micro_batch_size})")
    if args.model_name is not None and not args.estimate_only:
        raise ValueError("--model_name is for --estimate_only true; a run uses checkpoint_dir's model_config.json")
    if "qlora" in args.methods and not args.estimate_only:
        require_bitsandbytes("--methods with qlora")  # before any method runs
    earlier = [str(args.out_dir / m) for m in args.methods if (args.out_dir / m / "state.pth").is_file()]
    if earlier and not args.estimate_only and not args.overwrite:
        raise ValueError(f"{', '.join(earlier)} hold(s) the runs of an earlier comparison: measure again with "
                         "--overwrite true (they are replaced), or choose another --out_dir")
    config = (Config.from_name(args.model_name) if args.model_name is not None
              else read_config(check_checkpoint_dir(args.checkpoint_dir) / "model_config.json"))
    device = "cuda" if torch.cuda.is_available() or args.estimate_only else "cpu"  # an estimate is for a GPU
    # An estimate describes a GPU run, so by default the precision such a run takes (bf16-true), even on a CPU.
    precision = args.precision or ("bf16-true" if args.estimate_only else default_precision())
    data = data_facts(args, config)
    estimates = {m: estimate_memory(config, training_setup(m, args, precision, device, data)) for m in args.methods}
    print(f"Predicted memory of one training step ({config.name or 'model'}, {precision}, micro batch "
          f"{args.micro_batch_size} x {data['seq_length']} tokens, {device}; lit_lora/memory.py):\n")
    print(format_estimates({NAMES[m]: e for m, e in estimates.items()}) + "\n", flush=True)
    if args.estimate_only:
        return {"estimates": estimates, "results": []}

    results = []
    for method in args.methods:
        summary = run_in_own_process(method, method_flags(method, args, precision), args.out_dir / method)
        time_per_step, tokens_per_sec = loop_timing(args.out_dir / method)
        flops = step_flops(config, estimates[method].setup)["total"] * (args.global_batch_size // args.micro_batch_size)
        results.append({
            "method": method, "trainable_parameters": summary["trainable_parameters"],
            "total_parameters": summary["total_parameters"],
            "trainable_percent": 100 * summary["trainable_parameters"] / summary["total_parameters"],
            "checkpoint_bytes": summary["weights_bytes"], "peak_memory_bytes": summary["peak_memory_bytes"],
            "baseline_memory_bytes": summary["baseline_memory_bytes"],
            "predicted_memory_bytes": estimates[method].total, "time_per_step_s": time_per_step,
            "tokens_per_sec": tokens_per_sec, "val_loss": summary["val_loss"], "steps": summary["steps"],
            "run_time_s": summary["time_s"], "predicted_flops_per_step": flops, "precision": precision,
            "device": device,
        })
    quality = evaluate_all(args, precision) if args.evaluate else []
    write_results(args.out_dir, results, estimates, quality)
    print_comparison(results, quality)
    return {"estimates": estimates, "results": results, "quality": quality}


# ---------------------------------------------------------------------------------------------------------
# What each method runs


def data_facts(args: CompareArgs, config: Config) -> dict:
    """The longest training example after truncation (the peak micro batch is padded to it) and the share of
    tokens that carry loss."""
    try:
        train, _, prepared = load_prepared(args.data_dir)
    except FileNotFoundError:
        if not args.estimate_only:
            raise
        return {"seq_length": args.seq_length or 256, "label_fraction": 1.0}
    max_seq_length = min(args.max_seq_length or prepared["max_seq_length"], config.block_size)  # as fit() does
    longest = max(min(len(example["input_ids"]), max_seq_length) for example in train)
    return {"seq_length": args.seq_length or longest, "label_fraction": prepared["loss_token_share"]}


def training_setup(method: str, args: CompareArgs, precision: str, device: str, data: dict) -> TrainingSetup:
    """The estimate's inputs, with each method's hyperparameters (LoRA r, targets, ...) as its script's defaults."""
    defaults = script_defaults(method)
    return TrainingSetup(
        method=method, precision=precision, micro_batch_size=args.micro_batch_size, seq_length=data["seq_length"],
        label_fraction=data["label_fraction"], device=device, quantize=args.quantize,
        **{name: defaults[name] for name in METHOD_HYPERPARAMETERS if name in defaults},
    )


def script_defaults(method: str) -> dict:
    """The default of every flag of the method's script, read from its dataclass: not an instance of it, whose checks
    would look at the default --out_dir (which may hold a run of the user's, none of this comparison's business)."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(METHOD_ARGS[method])}


def method_flags(method: str, args: CompareArgs, precision: str) -> list[str]:
    """The command-line flags of the method's script for this comparison: shared settings, the method's own
    learning rate (QLoRA's is LoRA's), QLoRA's --quantize, no evaluation or checkpoint during the run (they would
    count as step time)."""
    flags = {
        "checkpoint_dir": args.checkpoint_dir, "data_dir": args.data_dir, "out_dir": args.out_dir / method,
        "precision": precision, "max_steps": args.max_steps, "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size, "seed": args.seed, "eval_interval": 0, "save_interval": 0,
        "eval_examples": args.eval_examples, "log_interval": max(1, args.max_steps // 10),
        "overwrite": args.overwrite,
    }
    if method == "qlora":
        flags["quantize"] = args.quantize
    learning_rate = getattr(args, f"{SCRIPTS[method]}_learning_rate")  # QLoRA: LoRA's
    if learning_rate is not None:
        flags["learning_rate"] = learning_rate
    if args.warmup_steps is not None:
        flags["warmup_steps"] = args.warmup_steps
        if script_defaults(method)["warmup_epochs"] is not None:  # the adapter counts warmup in epochs by default
            flags["warmup_epochs"] = "null"
    if args.max_seq_length is not None:
        flags["max_seq_length"] = args.max_seq_length
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def run_in_own_process(method: str, flags: list[str], run_dir: Path) -> dict:
    """Run `python finetune/<script>.py <flags>` (the method's script, SCRIPTS) in a fresh process and return the
    summary its fit() returned.

    The child is `run_child` below: the script's own CLI and main(), plus writing the summary to a JSON
    file (a process cannot return a dict). The output streams to this terminal as the run goes.
    """
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # never read a previous run's figures
    print(f"\n=== {NAMES[method]}: python finetune/{SCRIPTS[method]}.py {' '.join(flags)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if not torch.cuda.is_available():
        # On a CPU the figure is the peak RSS. glibc's malloc keeps freed blocks (the activations of earlier
        # micro batches) in its heap and raises its mmap threshold as they are freed, so the RSS would grow
        # with every micro batch. A fixed threshold maps each block of 64 KiB or more on its own and returns
        # it when freed: the peak RSS then follows the live tensors. (Ignored outside glibc.)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    code = "from finetune.compare import run_child; run_child()"
    completed = subprocess.run([sys.executable, "-c", code, str(summary_path), method, *flags], env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{NAMES[method]} failed (exit code {completed.returncode}): its output is above. "
                           f"Run it alone with: python finetune/{SCRIPTS[method]}.py {' '.join(flags)}")
    return json.loads(summary_path.read_text())


def run_child() -> None:
    """In the child process: argv is SUMMARY_JSON METHOD FLAGS... Runs the script's main on its own CLI."""
    summary_path, method, *flags = sys.argv[1:]
    if method == "qlora":  # a fixed cost like torch's (about 45 MB of RSS): in the baseline, not in the run's memory
        require_bitsandbytes()
    # What the process holds before training: Python, torch, Lightning (RSS on a CPU; nothing on a GPU yet)
    baseline = 0 if torch.cuda.is_available() else peak_memory_bytes()
    script = importlib.import_module(f"finetune.{SCRIPTS[method]}")
    summary = script.main(CLI(METHOD_ARGS[method], as_positional=False, args=flags))
    summary["baseline_memory_bytes"] = baseline
    atomic_write(Path(summary_path), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))


def loop_timing(run_dir: Path) -> tuple[float, float]:
    """(seconds per optimizer step, tokens per second) of the training loop alone: medians over steps 2..N.

    fit()'s own time includes the first step (where AdamW allocates its state and kernels warm up) and the
    final evaluation and save (for full finetuning, a whole checkpoint and the optimizer state). The loop
    logs every step's own time and example tokens (step_time_s, step_tokens) to logs/version_N/metrics.csv.
    The median leaves out the odd step slowed down by something else on the machine. (A one-step run: step 1.)
    """
    logs = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        raise FileNotFoundError(f"No training log in {run_dir / 'logs'}: the run did not log its steps")
    with open(logs[-1]) as f:  # the newest run in this folder; the evaluation's rows have no step_time_s
        steps = [(float(row["step_time_s"]), float(row["step_tokens"])) for row in csv.DictReader(f)
                 if row.get("step_time_s")]
    after_first = steps[1:] or steps
    return (statistics.median(step_time for step_time, _ in after_first),
            statistics.median(step_tokens / step_time for step_time, step_tokens in after_first))


# ---------------------------------------------------------------------------------------------------------
# Quality: the base model and each finetune on the same items


def evaluate_all(args: CompareArgs, precision: str) -> list[dict]:
    """Run the evaluate script of the base model and of each method's result, as `python evaluate/<script>.py
    FLAGS` would (in this process: a Python start each would cost seconds, and no memory is measured here), and read
    back a row each: the test split's loss and perplexity, and each task's first metric (acc, exact_match, ...)."""
    flags = ["--checkpoint_dir", str(args.checkpoint_dir), "--data_dir", str(args.data_dir),
             "--precision", precision if precision.endswith("-true") else "32-true"]  # evaluation is not mixed
    for name, value in (("tasks", args.tasks), ("include_path", args.include_path), ("limit", args.limit)):
        flags += [f"--{name}", str(value)] if value is not None else []
    rows = []
    for method in ("base", *args.methods):
        run_dir = args.out_dir / method
        own = {"lora": ["--lora_path", str(run_dir / "lit_lora_finetuned.pth")],
               "qlora": ["--lora_path", str(run_dir / "lit_lora_finetuned.pth"), "--quantize", args.quantize],
               "adapter": ["--adapter_path", str(run_dir / "lit_adapter_finetuned.pth")],
               "full": ["--checkpoint_dir", str(run_dir)]}.get(method, [])  # full: its own checkpoint folder
        script = SCRIPTS.get(method, method)  # QLoRA: evaluate/lora.py --quantize; the base model: evaluate/base.py
        command = [str(ROOT / "evaluate" / f"{script}.py"), *flags, *own, "--output_path",
                   str(run_dir / "evaluation.json")]
        print(f"\n=== Evaluating {NAMES[method]}: python evaluate/{script}.py {' '.join(command[1:])}", flush=True)
        argv, sigint, sys.argv = sys.argv, signal.getsignal(signal.SIGINT), command
        try:
            runpy.run_path(command[0], run_name="__main__")
        except SystemExit as exit:  # the script's own one-line error is above
            if exit.code == 130:
                raise KeyboardInterrupt from None
            if exit.code:
                raise RuntimeError(f"Evaluating {NAMES[method]} failed: its output is above. Run it alone with: "
                                   f"python evaluate/{script}.py {' '.join(command[1:])}") from None
        finally:
            sys.argv = argv
            signal.signal(signal.SIGINT, sigint)  # a script done ignores Ctrl-C (lit_lora/cli.py): not compare.py
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        row = {"method": method, "test_loss": evaluation["test_split"]["loss"],
               "test_perplexity": evaluation["test_split"]["perplexity"]}
        for task, metrics in evaluation.get("results", {}).items():
            metric = next((m for m in metrics if "," in m and "_stderr" not in m), None)  # "acc,none"
            if metric is not None and isinstance(metrics[metric], (int, float)):
                row[f"{task} {metric.split(',')[0]}"] = metrics[metric]
        rows.append(row)
    return rows


def quality_table(quality: list[dict]) -> str:
    columns = [c for c in quality[0] if c != "method"]
    lines = ["| model | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in quality:
        lines.append(f"| {NAMES[row['method']]} | " + " | ".join(
            f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Results


CSV_COLUMNS = ("method", "trainable_parameters", "total_parameters", "trainable_percent", "checkpoint_bytes",
               "peak_memory_bytes", "baseline_memory_bytes", "predicted_memory_bytes", "time_per_step_s",
               "tokens_per_sec", "val_loss", "steps", "run_time_s", "predicted_flops_per_step", "precision", "device")


def markdown_table(results: list[dict]) -> str:
    on_cpu = any(r["device"] == "cpu" for r in results)
    header = ["method", "trainable parameters", "checkpoint size", "peak memory"]
    header += ["above baseline"] if on_cpu else []
    header += ["predicted memory", "time per step", "tokens/s", "val loss"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in results:
        cells = [NAMES[r["method"]], f"{r['trainable_parameters']:,} ({r['trainable_percent']:.2f}%)",
                 format_bytes(r["checkpoint_bytes"]), format_bytes(r["peak_memory_bytes"])]
        cells += [format_bytes(r["peak_memory_bytes"] - r["baseline_memory_bytes"])] if on_cpu else []
        cells += [format_bytes(r["predicted_memory_bytes"]), f"{r['time_per_step_s']:.3f} s",
                  f"{r['tokens_per_sec']:,.0f}", f"{r['val_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, results: list[dict], estimates: dict[str, MemoryEstimate],
                  quality: list[dict]) -> None:
    """results.csv (a row per method, and the base model's row when evaluated), results.md, results.png."""
    r0 = results[0]
    by_method = {row["method"]: row for row in quality}
    quality_columns = [c for c in (quality[0] if quality else {}) if c != "method"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS) + quality_columns)
    writer.writeheader()
    writer.writerows([{**by_method.get(r["method"], {}), **r} for r in results])
    if "base" in by_method:
        writer.writerow(by_method["base"])
    atomic_write(out_dir / "results.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    memory_note = ("peak resident memory (RSS) of each run's process; `above baseline` subtracts what the "
                   "process held after importing Python, torch and Lightning" if r0["device"] == "cpu"
                   else "torch.cuda.max_memory_allocated of each run's process")
    text = (f"# {' vs '.join(NAMES[r['method']] for r in results)}\n\n{r0['steps']} optimizer steps each, {r0['precision']}, "
            f"on {r0['device']}. Peak memory: {memory_note}. Time per step and tokens/s: medians over the training "
            "loop's steps 2.. (no evaluation, no checkpoint). Val loss: after the run.\n\n"
            + markdown_table(results) + "\n\n## Predicted memory (lit_lora/memory.py)\n\n"
            + format_estimates({NAMES[m]: e for m, e in estimates.items()}) + "\n")
    if quality:
        text += ("\n## Quality (evaluate/*.py: the loss and perplexity over the whole test split; task metrics from "
                 "lm-eval-harness)\n\n" + quality_table(quality) + "\n")
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    try:
        plot(out_dir / "results.png", results)
    except ImportError:
        print(f"matplotlib is not installed, so no {out_dir / 'results.png'}: pip install -e '.[plot]' for the chart")


def plot(path: Path, results: list[dict]) -> None:
    """Bar charts of peak memory (measured and predicted), time per step and checkpoint size."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    names = [NAMES[r["method"]] for r in results]
    positions = range(len(results))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    measured = [(r["peak_memory_bytes"] - r["baseline_memory_bytes"]) / 1e9 for r in results]
    axes[0].bar([p - 0.2 for p in positions], measured, width=0.4, label="measured")
    axes[0].bar([p + 0.2 for p in positions], [r["predicted_memory_bytes"] / 1e9 for r in results], width=0.4,
                label="predicted")
    axes[0].set_title("peak memory (GB)" + (", above baseline" if results[0]["device"] == "cpu" else ""))
    axes[0].legend()
    axes[1].bar(positions, [r["time_per_step_s"] for r in results])
    axes[1].set_title("time per optimizer step (s)")
    axes[2].bar(positions, [r["checkpoint_bytes"] / 1e6 for r in results])
    axes[2].set_yscale("log")
    axes[2].set_title("checkpoint size (MB, log scale)")
    for ax in axes:
        ax.set_xticks(list(positions), names)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def print_comparison(results: list[dict], quality: list[dict]) -> None:
    print("\n" + markdown_table(results) + "\n")
    if quality:
        print(quality_table(quality) + "\n")
    full = next((r for r in results if r["method"] == "full"), None)
    for r in results:
        measured = r["peak_memory_bytes"] - r["baseline_memory_bytes"]
        line = (f"{NAMES[r['method']]:16s} memory: predicted {format_bytes(r['predicted_memory_bytes'])}, measured "
                f"{format_bytes(r['peak_memory_bytes'])}")
        if r["baseline_memory_bytes"]:
            line += f" ({format_bytes(measured)} above the {format_bytes(r['baseline_memory_bytes'])} baseline)"
        if full is not None and r is not full:
            line += (f"; time per step {r['time_per_step_s'] / full['time_per_step_s']:.2f}x full finetuning's "
                     f"(predicted matmul FLOPs: {r['predicted_flops_per_step'] / full['predicted_flops_per_step']:.2f}x)")
        print(line)
    lora, qlora = (next((r for r in results if r["method"] == m), None) for m in ("lora", "qlora"))
    if lora is not None and qlora is not None:  # what the 4-bit base saves and costs, measured in the same run
        measured = {name: r["peak_memory_bytes"] - r["baseline_memory_bytes"] for name, r in (("lora", lora), ("qlora", qlora))}
        print(f"QLoRA vs LoRA: {measured['qlora'] / measured['lora']:.2f}x the measured memory"
              f"{' above the baseline' if lora['baseline_memory_bytes'] else ''} "
              f"({qlora['predicted_memory_bytes'] / lora['predicted_memory_bytes']:.2f}x predicted), "
              f"{qlora['tokens_per_sec'] / lora['tokens_per_sec']:.2f}x the tokens/s")


if __name__ == "__main__":
    cli(main, CompareArgs)
