"""The figures a run reports: parameters, peak memory, sizes and durations, and a training run's progress."""

import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from lit_lora.flops import compute_dtype, example_flops, matmul_peak_flops, run_setup


def num_parameters(module: nn.Module, trainable: Optional[bool] = None) -> int:
    """Parameters of `module`: all of them, or only the (non-)trainable ones. Works on the meta device.
    A 4-bit weight (QLoRA, lit_lora/quantize.py) counts the weights it holds, not its bytes (two per byte): the
    shape it was quantized from, which its quant_state keeps."""
    def count(p: torch.Tensor) -> int:
        quant_state = getattr(p, "quant_state", None)
        return quant_state.shape.numel() if quant_state is not None else p.numel()

    return sum(count(p) for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size (RSS).

    On Linux the RSS peak is VmHWM of /proc/self/status: getrusage's ru_maxrss would count the RSS of the
    process that started this one too (Linux carries it over fork and exec), so a run started by a big process
    (finetune/compare.py) would report that process's memory."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if sys.platform == "linux":
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the BSDs kilobytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """What a run reports: every step's figures in the CSV log, a progress line every `log_interval` steps, and
    the summary at the end (time, tokens/s, padding, FLOP/s against the machine's measured peak, peak memory,
    parameters, the size of the weights written)."""

    def __init__(self, fabric, model: nn.Module, args, max_steps: int):
        self.fabric, self.max_steps, self.log_interval = fabric, max_steps, args.log_interval
        self.trainable, self.total = num_parameters(model, trainable=True), num_parameters(model)
        self.config, self.setup = model.config, run_setup(args, args.precision)
        fabric.print(f"Trainable parameters: {self.trainable:,} of {self.total:,} "
                     f"({100 * self.trainable / self.total:.3f}%)")

    def begin(self, start_step: int) -> None:
        """The loop starts (after start_step steps of an earlier run): times and tokens count from here."""
        self.start_step, self.tokens_seen, self.positions_seen = start_step, 0, 0
        self.flops_seen, self.step_seconds = 0.0, 0.0
        self.start_time = self.last_line = time.perf_counter()

    def log(self, completed: int, loss: float, lr: float, step_time: float, examples: list[tuple[int, int]],
            positions: int) -> None:
        """examples: (tokens, label tokens) of each example of the step's global batch; positions: what its micro
        batches computed, padding included."""
        step_tokens = sum(tokens for tokens, _ in examples)
        self.tokens_seen, self.positions_seen, self.step_seconds = (self.tokens_seen + step_tokens,
                                                                    self.positions_seen + positions,
                                                                    self.step_seconds + step_time)
        self.flops_seen += sum(example_flops(self.config, self.setup, *example) for example in examples)
        elapsed = time.perf_counter() - self.start_time
        self.fabric.log_dict({"loss": loss, "lr": lr, "step_time_s": step_time, "step_tokens": step_tokens,
                              "padding": 1 - step_tokens / positions, "tokens_per_sec": self.tokens_seen / elapsed},
                             step=completed)
        # every log_interval steps, and also after the first step and at least every 30 s: progress within seconds
        if completed % self.log_interval == 0 or completed in (self.start_step + 1, self.max_steps) \
                or time.perf_counter() - self.last_line > 30:
            self.last_line = time.perf_counter()
            eta = elapsed / (completed - self.start_step) * (self.max_steps - completed)
            self.fabric.print(f"step {completed}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                              f"{self.tokens_seen / elapsed:,.0f} tokens/s | ETA {format_duration(eta)}")

    def summary(self, final_loss: Optional[float], val_loss: Optional[float], out_dir: Path) -> dict:
        elapsed, steps = time.perf_counter() - self.start_time, self.max_steps - self.start_step
        # FLOP/s per device, over the training steps only (not evaluation and saving), against the peak measured
        # now, for at most 5% of the steps' time
        flops_per_sec = self.flops_seen / max(self.step_seconds, 1e-9) / self.fabric.world_size
        dtype = compute_dtype(self.setup.precision, self.fabric.device)
        peak = matmul_peak_flops(dtype, self.fabric.device, seconds=min(0.5, 0.05 * self.step_seconds))
        summary = {
            "steps": steps, "time_s": elapsed, "tokens_per_sec": self.tokens_seen / elapsed,
            "time_per_step_s": elapsed / max(1, steps), "peak_memory_bytes": peak_memory_bytes(self.fabric.device),
            "padding": 1 - self.tokens_seen / max(1, self.positions_seen), "flops_per_sec": flops_per_sec,
            "peak_flops_per_sec": peak, "trainable_parameters": self.trainable,
            "total_parameters": self.total, "final_loss": final_loss, "val_loss": val_loss,
            "weights_bytes": weights_size(out_dir),
        }
        self.fabric.print(
            f"Done: {steps} steps in {format_duration(elapsed)}, {summary['tokens_per_sec']:,.0f} tokens/s, peak "
            f"memory {format_bytes(summary['peak_memory_bytes'])}, trainable {self.trainable:,} of {self.total:,} "
            f"parameters, weights {format_bytes(summary['weights_bytes'])} in {out_dir}")
        if steps:
            self.fabric.print(
                f"Compute: {flops_per_sec / 1e9:,.1f} GFLOP/s of real tokens per device, "
                f"{100 * flops_per_sec / peak:.0f}% of the {peak / 1e9:,.0f} GFLOP/s this device multiplies "
                f"{str(dtype).removeprefix('torch.')} matrices at (measured now); padding "
                f"{100 * summary['padding']:.0f}% of the positions computed")
        return summary


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix == ".pth"
               and f.name != "state.pth")
