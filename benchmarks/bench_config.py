"""What the benchmark scripts share: their fixed CPU model, LLaMA's shape at 8 layers of width 512 (8 heads, the
32,000-token vocabulary), 60M parameters (not a published model, so not among lit_lora/model.py's presets); and
what tells a figure measured on a busy machine from one measured on a quiet one."""

import os

from lit_lora.model import Config


def bench_config() -> Config:
    return Config(name="bench-8x512", block_size=256, n_layer=8, n_head=8, n_embd=512)


def machine_load() -> str:
    """The load average at the start of a benchmark, with a warning where it is not well under 1: on a busy machine
    the figures mean little (on 2 cores, a parallel job made identical runs many times slower)."""
    if not hasattr(os, "getloadavg"):
        return "load average: unknown on this system"
    load = os.getloadavg()[0]
    line = f"load average at the start: {load:.2f} on {os.cpu_count()} cores"
    if load >= 0.5:
        line += " -- WARNING: not a quiet machine; the figures below may be far off. Measure again when it is quiet."
    return line


def spread_warning(name: str, times: list[float], limit: float = 0.2) -> str:
    """A warning when the repeats of one measurement disagree by more than `limit` (slowest / fastest - 1): the
    machine was busy meanwhile, and the best figure may be luck. "" when they agree."""
    spread = max(times) / min(times) - 1
    if spread <= limit:
        return ""
    return f"WARNING: the repeats of {name} disagree by {100 * spread:.0f}% (more than {100 * limit:.0f}%): busy machine?"
