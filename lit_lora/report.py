"""The figures a run reports: parameters, peak memory, sizes and durations (a training run's progress: progress.py)."""

import resource
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn


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


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix == ".pth"
               and f.name != "state.pth")
