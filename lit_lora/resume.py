"""Saving a run and resuming it exactly, for the training loop (lit_lora/train.py).

A run can stop anywhere: Ctrl-C, a kill, a crash, a preempted job. What it needs to go on is small, because
everything random in a step is drawn from a seed made of (seed, process, step), and the data order is a
function of (seed, step): the number of completed optimizer steps, the trainable weights and AdamW's state.
`state.pth` holds those, and what identifies the run (the flags that decide its result, the training data's
sha256, a fingerprint of the base weights), so that resuming another run by mistake is refused.

Every file is written under a temporary name beside it and renamed when whole; a step folder appears whole or
not at all; and the method's file is written before state.pth, so a crash between the two only makes the
resumed run redo a few steps and write the file again.
"""

import json
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lit_lora.files import (
    atomic_folder,
    atomic_save,
    atomic_write,
    current_umask,
    file_sha256,
    load_torch_file,
)

if TYPE_CHECKING:  # named in annotations only: Lightning is imported by the scripts that train
    from lightning.fabric import Fabric

try:
    import fcntl  # flock: the out_dir lock (Linux, macOS)
except ImportError:
    fcntl = None


@contextmanager
def interrupt_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block has run: the optimizer step updates every parameter or none."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# The flags a resumed run may change: where things are, how the work is split, what is printed and saved, and
# activation checkpointing (which changes memory and time, not results). Every other flag (the seed, batch size, schedule, precision, the method's hyperparameters) decides the
# run's result, and resuming with another value is refused.
RESUME_MAY_CHANGE = {"checkpoint_dir", "data_dir", "out_dir", "devices", "num_nodes", "strategy", "micro_batch_size",
                     "eval_interval", "eval_examples", "eval_instruction", "eval_input", "eval_max_new_tokens",
                     "save_interval", "log_interval", "resume", "overwrite", "activation_checkpointing",
                     "packing"}
# How a step's work is split (recorded as the run's "split"): resuming with another split goes on, but not bit for
# bit, as the dropout masks are drawn per device and per micro batch, and the sums are added in another order
SPLIT_FLAGS = ("micro_batch_size", "devices", "num_nodes", "packing")


def run_identity(args, model: nn.Module) -> dict:
    """What decides a run's result: every flag but RESUME_MAY_CHANGE, the training data's sha256 and the
    base weights' fingerprint (paths may move; contents may not)."""
    identity = {name: value for name, value in asdict(args).items() if name not in RESUME_MAY_CHANGE}
    identity["method"] = type(args).__name__.removesuffix("Args").lower()  # LoRAArgs -> lora: which script
    identity["data"] = file_sha256(Path(args.data_dir) / "train.pt")
    identity["base_weights"] = getattr(model, "base_fingerprint", None)
    identity["split"] = {name: getattr(args, name) for name in SPLIT_FLAGS}
    return json.loads(json.dumps(identity, default=str))  # plain JSON values: tuples as lists, paths as strings


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors on the CPU, whole: a sharded (FSDP) parameter is gathered from every device.
    A collective when sharded: every process calls it; only rank 0 keeps the result."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if isinstance(param, DTensor) else param
            if rank == 0:
                state[name] = tensor.detach().cpu()
    return state


def save_checkpoint(fabric: "Fabric", module: nn.Module, optimizer: torch.optim.Optimizer, step: int, run: dict,
                    folder: Path, out_dir: Path, save_weights: Callable) -> None:
    """The method's file(s) in `folder`, then the resumable state out_dir/state.pth, each written whole.

    The order matters: a crash between the two leaves the previous state, so a resumed run redoes the steps
    since then and writes `folder` again, never leaving it incomplete. A step folder (`step-NNNNNN`) appears
    whole or not at all; in out_dir itself each file appears whole (out_dir also holds the logs)."""
    trained = trainable_state(module)
    optimizer_state = get_optimizer_state_dict(module, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fabric.global_rank == 0:
        with atomic_folder(folder, replace=folder != out_dir) as tmp:
            save_weights(module, tmp, trained)
        atomic_save({"model": trained, "optimizer": optimizer_state, "step": step, "run": run}, out_dir / "state.pth")
    fabric.barrier()


def save_on_interrupt(fabric: "Fabric", module: nn.Module, optimizer: torch.optim.Optimizer, completed: int, run: dict,
                      out_dir: Path, sharded: bool) -> None:
    """Ctrl-C: save the state after the last completed optimizer step, then exit with code 130.

    With sharded weights, saving needs every process to take part, which an interrupt cannot promise:
    the run then resumes from the last state it saved."""
    if sharded:
        fabric.print(f"\nInterrupted after step {completed}: with FSDP the state is not saved on an interrupt. "
                     f"Continue from the last saved state with --resume auto.")
    else:
        if fabric.global_rank == 0:
            optimizer_state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(cpu_offload=True))
            atomic_save({"model": trainable_state(module), "optimizer": optimizer_state, "step": completed,
                         "run": run}, out_dir / "state.pth")
        fabric.print(f"\nInterrupted after step {completed}: saved the resumable state {out_dir / 'state.pth'}. "
                     "Continue with --resume auto.")
    raise SystemExit(130)


def start_or_resume(fabric: "Fabric", args, module: nn.Module, optimizer: torch.optim.Optimizer, run: dict,
                    sharded: bool) -> int:
    """Prepare out_dir (its leftovers removed, hyperparameters.json written) and, with --resume, restore the
    saved state; return the number of optimizer steps already completed (0 for a fresh run)."""
    out_dir = Path(args.out_dir)
    completed = 0
    path = find_resume_path(args.resume, out_dir)
    if path is not None:
        completed, saved_split = load_state(path, module, optimizer, run, sharded)
        fabric.print(f"Resumed from {path} after step {completed}")
        changed = [f"--{name} {run['split'][name]} (saved: {saved_split[name]})" for name in SPLIT_FLAGS
                   if saved_split and saved_split.get(name) != run["split"][name]]
        if changed:
            fabric.print(f"Note: {', '.join(changed)}: the run goes on, but not bit for bit as an uninterrupted one "
                         "(dropout masks are drawn per device and per micro batch, and sums add up in another order)")
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock_out_dir(out_dir)  # before anything in out_dir is touched
        remove_leftovers(out_dir)
        hyperparameters = {**asdict(args), "prompt": getattr(module, "prompt_format", None)}  # and the data's format
        atomic_write(out_dir / "hyperparameters.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(hyperparameters, indent=2, default=str)))
    return completed


def refuse_to_start_over(out_dir: Union[str, Path], resume, overwrite: bool) -> None:
    """A new run (no --resume) in an out_dir that holds an earlier run's state would replace that state at its first
    save, and the earlier steps would be lost: refused unless --overwrite, in one line saying which step is saved."""
    saved = Path(out_dir) / "state.pth"
    if resume not in (False, None) or overwrite or not saved.is_file():
        return
    try:
        step = f"after step {int(torch.load(saved, mmap=True, weights_only=True, map_location='cpu')['step'])}"
    except Exception:  # damaged or not ours: still not to be replaced without asking
        step = "a file this version cannot read"
    raise ValueError(f"{out_dir} holds the resumable state of an earlier run ({saved}: {step}). Continue it with "
                     "--resume auto, start over with --overwrite true (the saved steps are replaced), or choose "
                     "another --out_dir.")


def find_resume_path(resume: Union[bool, str, Path], out_dir: Path) -> Optional[Path]:
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        path = out_dir / "state.pth"
        return path if path.is_file() else None  # auto: a fresh start when there is nothing to resume
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such state file (a run writes one as <out_dir>/state.pth)")
    return path


def load_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, run: dict,
               sharded: bool) -> tuple[int, Optional[dict]]:
    """Restore the trainable weights and the optimizer from `path`, after checking that the saved run is this
    run; return the number of completed steps and how the saved run split its steps (None for older states)."""
    state = load_torch_file(path, "a resumable state written by lit-lora", "start afresh, or resume from another "
                            "state (a run's out_dir/state.pth)", mmap=True)
    if not isinstance(state, dict) or not {"run", "model", "optimizer", "step"} <= set(state) \
            or not isinstance(state["run"], dict):
        raise ValueError(f"--resume {path}: not a resumable state written by this version of lit-lora; start afresh")
    saved_method = state["run"].get("method")
    if saved_method != run["method"] and saved_method is not None:
        raise ValueError(f"--resume {path}: the state was written by finetune/{saved_method}.py, not by "
                         f"finetune/{run['method']}.py: resume it with the script that wrote it, or start a new run "
                         "in another --out_dir.")
    for name in sorted((set(run) | set(state["run"])) - {"method", "split"}):  # method: above; split: may change
        saved, now = state["run"].get(name), run.get(name)
        if saved != now:
            what = {"data": "the training data (train.pt)", "base_weights": "the base model's weights"}.get(name,
                                                                                                        f"--{name}")
            raise ValueError(f"--resume {path}: {what} differs from the saved run's ({saved!r} then, {now!r} now). "
                             "Resume with the same value, or start a new run in another --out_dir.")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(state["model"]) != trainable:
        missing, unexpected = sorted(trainable - set(state["model"])), sorted(set(state["model"]) - trainable)
        raise ValueError(f"{path} does not fit this run's trainable parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}. Was it made by another method or with other LoRA targets?")
    options = StateDictOptions(full_state_dict=True, strict=False) if sharded else StateDictOptions(strict=False)
    set_model_state_dict(module, state["model"], options=options)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)
    return state["step"], state["run"].get("split")


HELD_LOCKS: dict[Path, int] = {}  # out_dir -> the open .lock file this process holds (until the run ends)


def lock_out_dir(out_dir: Path) -> None:
    """One run at a time writes `out_dir`: a second run would delete the first's temporary files at its start, and
    both would write the same files. The lock is an flock on out_dir/.lock, which holds the pid of the run that has
    it; the operating system releases it when that process ends, however it ends, so a run killed with -9 leaves no
    stale lock behind. Only Linux and macOS have flock; elsewhere no lock is taken."""
    out_dir = out_dir.resolve()
    if fcntl is None or out_dir in HELD_LOCKS:  # no flock here, or this process holds it already (a second run)
        return
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"{out_dir} is in use by another run (pid {holder}, which holds {out_dir / '.lock'}): wait "
                         "for it to end, stop it, or choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    HELD_LOCKS[out_dir] = fd


def unlock_out_dir(out_dir: Path) -> None:
    """Release the lock of `out_dir` that this process holds (the end of a run); .lock stays, with the last pid."""
    fd = HELD_LOCKS.pop(Path(out_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file releases the flock


def remove_leftovers(out_dir: Path) -> None:
    """Temporary files and folders that a killed run can leave in out_dir (.NAME.XXXX.tmp from an atomic write,
    .NAME.old-XXXX from a folder swap): everything in them is rewritten from the resumable state."""
    for path in list(out_dir.glob(".*.tmp")) + list(out_dir.glob(".*.old-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
