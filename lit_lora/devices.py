"""Devices, strategies and precision for training, through Lightning Fabric: one device; DDP, a whole replica of
the model per device (LoRA and LLaMA-Adapter, whose frozen weights fit on one GPU); or FSDP, every Block's weights,
gradients and optimizer state split over the devices (full finetuning), with torch's `fully_shard`.
Fabric also starts the other processes and applies the precision (lit_lora/train.py says what each means).

Lightning and torch's FSDP are imported where a function uses them, not here: importing them takes seconds, which
the scripts that only read a precision (generate/, evaluate/) need not pay.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def default_precision() -> str:
    """The precision a run gets without --precision: what the hardware multiplies fastest.

    A GPU that supports bfloat16: bf16-true (bf16 weights: a 7B model's take half of fp32's, so LoRA on it fits a
    24 GB card). A CPU that multiplies bf16 natively (AVX512-BF16 or AMX on x86): bf16-mixed, products in bf16
    with fp32 master weights (howto/finetune_lora.md measures it against fp32). Any other CPU: fp32, as bf16
    products there are emulated, many times slower (the run's summary prints the measured speed of its products)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    if cpu_multiplies_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_multiplies_bf16() -> str:
    """The CPU's native bf16 instructions ("AMX", "AVX512-BF16"), or "" where it has none (or torch cannot tell)."""
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return ""


def precision_line(precision: str, device_type: str) -> str:
    """The one line a run starts with when --precision was left out: the precision chosen, and why."""
    if device_type == "cuda":
        return f"Precision {precision}: this GPU {'supports' if precision == 'bf16-true' else 'has no'} bf16"
    if precision == "bf16-mixed":
        return (f"Precision bf16-mixed: this CPU multiplies bf16 natively ({cpu_multiplies_bf16()}); fp32 master "
                "weights (--precision 32-true for fp32 products)")
    return "Precision 32-true: this CPU has no native bf16 products (AVX512-BF16, AMX), where bf16 is slower than fp32"


def dtype_from_precision(precision: str) -> torch.dtype:
    """The dtype of the weights for a Fabric precision string ('bf16-mixed' keeps fp32 weights)."""
    dtypes = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16,
              "bf16-mixed": torch.float32, "16-mixed": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(dtypes)}")
    return dtypes[precision]


def launch_fabric(args, multi_device_strategy: str = "ddp") -> Fabric:
    """Start Fabric (and, for several devices, the other processes) before anything is built.

    `--strategy auto` on several devices means `multi_device_strategy`: DDP (a replica per device) for LoRA
    and Adapter, whose weights fit on one device; FSDP for full finetuning, sharding weights, gradients and
    optimizer state Block by Block.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    args.out_dir = Path(args.out_dir)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out_dir {args.out_dir} is a file, not a folder: choose another --out_dir")
    chosen = args.precision is None
    args.precision = args.precision or default_precision()  # recorded as run, in hyperparameters.json and state.pth
    strategy = args.strategy
    if strategy == "auto" and args.devices * args.num_nodes > 1:
        strategy = multi_device_strategy
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(shard_by_block, save_distributed_checkpoint=False,
                                         data_parallel_size=args.devices * args.num_nodes, tensor_parallel_size=1)
    fabric = Fabric(devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, precision=args.precision,
                    loggers=make_loggers(args.out_dir))
    fabric.launch()
    if chosen:
        fabric.print(precision_line(args.precision, fabric.device.type))
    if fabric.device.type == "cpu":
        fabric.print(busy_machine_warning() or "", end="")
    fabric.seed_everything(args.seed)  # the same initialisation (LoRA's A, the adapter's prompts) on every process
    return fabric


def busy_machine_warning() -> str:
    """On a CPU, torch runs one thread per core, and its threads wait for each other at every matrix product: when
    other programs keep even one core busy, a run can take several times as long as on a quiet machine. A warning
    saying so and what to do, or ""."""
    cores, busy = os.cpu_count() or 1, cores_busy_elsewhere()
    if busy is None or busy < 0.9:
        return ""
    return (f"Warning: other programs keep {busy:.1f} of this machine's {cores} cores busy: torch's threads will wait "
            "for them, and this run may take several times as long as on a quiet machine. Let the other work finish "
            "first, or give torch fewer threads, which loses less: OMP_NUM_THREADS=1 python ...\n")


def cores_busy_elsewhere(seconds: float = 0.25) -> Optional[float]:
    """How many cores other processes keep busy now: the machine's busy time over `seconds` in which this process
    waits (Linux's /proc/stat), in cores. Elsewhere the 1-minute load average, which counts this process too."""
    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            times = [int(t) for t in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        return sum(times) - times[3] - times[4], sum(times)

    try:
        busy, total = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return (busy_after - busy) / max(1, total_after - total) * (os.cpu_count() or 1)


def shard_by_block(model: nn.Module, device_mesh) -> nn.Module:
    """FSDP (torch's `fully_shard`): each Block's parameters are split over the devices and gathered only while
    that Block computes, forward and backward; gradients are reduce-scattered back into shards."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the embedding, final norm and lm_head
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing: each Block keeps only its input in the forward pass and computes the rest again
    in the backward pass, so the activations inside the Blocks never stay in memory at once: less memory for one
    more forward pass of time. Apply it before the model is sharded (fabric.setup_module)."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def make_loggers(out_dir: Path) -> list:
    from lightning.fabric.loggers import CSVLogger

    loggers = [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=1)]  # logs/version_N: a resumed run adds one
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    except (ImportError, ModuleNotFoundError):  # TensorBoard is optional
        pass
    return loggers


def is_sharded(fabric: Fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def reshard(module: nn.Module) -> None:
    """After forward passes with no backward pass (evaluation), FSDP keeps the outermost module's weights
    gathered, expecting the backward next: split them into shards again, as training left them."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()
