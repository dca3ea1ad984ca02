"""What a training run reports as it goes: every step's figures in the CSV log, a progress line, and the summary
(time, tokens/s, padding, FLOP/s of its real tokens against the machine's measured peak, memory, parameters)."""

import time
from pathlib import Path
from typing import Optional

import torch.nn as nn

from lit_lora.flops import compute_dtype, example_flops, matmul_peak_flops, run_setup
from lit_lora.report import format_bytes, format_duration, num_parameters, peak_memory_bytes, weights_size


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
            positions: int, figures: Optional[dict] = None) -> None:
        """examples: (tokens, label tokens) of each sequence of the step's global batch; positions: what its micro
        batches computed, padding included; figures: the objective's own (DPO's rewards), logged and printed."""
        step_tokens = sum(tokens for tokens, _ in examples)
        self.tokens_seen, self.positions_seen, self.step_seconds = (self.tokens_seen + step_tokens,
                                                                    self.positions_seen + positions,
                                                                    self.step_seconds + step_time)
        self.flops_seen += sum(example_flops(self.config, self.setup, *example) for example in examples)
        elapsed = time.perf_counter() - self.start_time
        self.fabric.log_dict({"loss": loss, "lr": lr, "step_time_s": step_time, "step_tokens": step_tokens,
                              "padding": 1 - step_tokens / positions, "tokens_per_sec": self.tokens_seen / elapsed,
                              **(figures or {})}, step=completed)
        # every log_interval steps, and also after the first step and at least every 30 s: progress within seconds
        if completed % self.log_interval == 0 or completed in (self.start_step + 1, self.max_steps) \
                or time.perf_counter() - self.last_line > 30:
            self.last_line = time.perf_counter()
            eta = elapsed / (completed - self.start_step) * (self.max_steps - completed)
            shown = "".join(f" | {name} {value:.4f}" for name, value in (figures or {}).items())
            self.fabric.print(f"step {completed}/{self.max_steps} | loss {loss:.4f}{shown} | lr {lr:.2e} | "
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
