"""The one training loop, shared by LoRA, LLaMA-Adapter and full finetuning.

What differs between the three methods is which parameters are trainable and which file holds the result;
the scripts in finetune/ set that up in a few lines and call `fit`. Everything else lives here once:

- data: shuffled epochs, one global batch per optimizer step, split into micro batches per device;
- loss: cross-entropy over label tokens only, normalised by the label tokens of the whole global batch
  (so a micro batch with more response tokens counts more, exactly as one big batch would);
- schedule: linear warmup, then cosine decay, counted in optimizer steps;
- Lightning Fabric for devices, precision and strategies (DDP, FSDP);
- evaluation, progress, CSV logs, checkpoints that resume exactly, Ctrl-C, NaN checks.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import FSDPStrategy

from lit_lora.data import IGNORE_INDEX, collate, format_prompt, load_prepared
from lit_lora.generation import generate
from lit_lora.model import Block
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import default_precision, format_bytes, num_parameters, peak_memory_bytes


@dataclass
class TrainArgs:
    """Hyperparameters shared by every finetuning script (each script sets its method's defaults).

    Args:
        checkpoint_dir: The base model's folder (lit_model.pth, model_config.json, tokenizer.model).
        data_dir: Prepared data (train.pt, test.pt) made by a prepare_data/ script.
        out_dir: Where the finetuned weights, step files, resumable state and logs go.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed; default bf16-true on a GPU that supports it, else 32-true.
        devices: Devices per node (GPUs, or CPU processes).
        num_nodes: Machines.
        strategy: auto, ddp or fsdp (see howto/ for what each does to memory).
        seed: Seeds the data order, dropout and initialisation.
        learning_rate: Peak learning rate, reached after warmup.
        weight_decay: AdamW's decoupled weight decay.
        global_batch_size: Examples per optimizer step, over all devices; gradient accumulation makes up the rest.
        micro_batch_size: Examples per forward/backward pass on one device.
        epochs: Passes over the training data (ignored when max_steps is given).
        max_steps: Optimizer steps to take; overrides epochs.
        warmup_steps: Optimizer steps of linear warmup, then cosine decay to min_lr.
        warmup_epochs: Warmup given in epochs instead (converted to optimizer steps); overrides warmup_steps.
        min_lr: The learning rate at the end of the cosine decay.
        grad_clip: Clip the gradient norm to this (0: no clipping).
        max_seq_length: Truncate examples to this many tokens (default: as prepared).
        eval_interval: Evaluate every this many optimizer steps (0: only at the end).
        eval_examples: Validation loss is computed on this fixed subset of test.pt.
        eval_instruction: The instruction answered by the sample generation at each evaluation.
        eval_input: Its optional input (context), as in the Alpaca template.
        eval_max_new_tokens: Length of that sample.
        save_interval: Save step files and the resumable state every this many optimizer steps (0: only at the end).
        log_interval: Print a progress line every this many optimizer steps.
        resume: Continue from a resumable state: a path to a state.pth, or auto (out_dir/state.pth if present).
    """

    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B")
    data_dir: Path = Path("data/alpaca")
    out_dir: Path = Path("out/lora/alpaca")
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    seed: int = 1337
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    global_batch_size: int = 128
    micro_batch_size: int = 4
    epochs: float = 3
    max_steps: Optional[int] = None
    warmup_steps: int = 100
    warmup_epochs: Optional[float] = None
    min_lr: float = 0.0
    grad_clip: float = 1.0
    max_seq_length: Optional[int] = None
    eval_interval: int = 100
    eval_examples: int = 100
    eval_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    eval_input: str = ""
    eval_max_new_tokens: int = 100
    save_interval: int = 1000
    log_interval: int = 1
    resume: Union[bool, Literal["auto"], Path] = False


def launch_fabric(args: TrainArgs, multi_device_strategy: str = "ddp", activation_checkpointing: bool = False) -> Fabric:
    """Start Fabric (and, for several devices, the other processes) before anything is built.

    `--strategy auto` on several devices means `multi_device_strategy`: DDP (a replica per device) for LoRA
    and Adapter, whose weights fit on one device; FSDP for full finetuning, sharding weights, gradients and
    optimizer state Block by Block.
    """
    args.out_dir = Path(args.out_dir)
    strategy = args.strategy
    if strategy == "auto" and args.devices * args.num_nodes > 1:
        # FSDP needs GPUs (Fabric's rule); on CPU processes full finetuning replicates with DDP instead
        strategy = multi_device_strategy if torch.cuda.is_available() else "ddp"
    if strategy == "fsdp":
        strategy = FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            state_dict_type="full",  # checkpoints load on one device
        )
    fabric = Fabric(devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
                    precision=args.precision or default_precision(), loggers=make_loggers(args.out_dir))
    fabric.launch()
    fabric.seed_everything(args.seed)
    return fabric


def make_loggers(out_dir: Path) -> list:
    loggers = [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=1)]  # logs/version_N: a resumed run adds one
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    except (ImportError, ModuleNotFoundError):  # TensorBoard is optional
        pass
    return loggers


def learning_rate_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay from max_lr to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def global_batch_indices(step: int, num_examples: int, global_batch_size: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: consecutive slices of a stream that is a fresh shuffle of the
    training set each epoch (every example once per epoch, no sampling with replacement). A pure function
    of (step, seed): resuming at a step needs no saved data order."""
    start = step * global_batch_size
    orders: dict[int, torch.Tensor] = {}
    indices = []
    for position in range(start, start + global_batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in orders:
            orders[epoch] = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


def loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token t+1 from positions <= t, over label tokens (not -100).

    Logits are computed only at the positions that predict a label: with the prompt masked, that skips
    the vocabulary projection (and its gradient) for every prompt token.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    predicts_label = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # (B, T); the last position predicts nothing
    logits = model(input_ids, output_mask=predicts_label)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(fabric: Fabric, model: nn.Module, args: TrainArgs,
        save_weights: Callable[[nn.Module, Path, dict], None]) -> dict:
    """Train the parameters of `model` that require grad; return the run's figures.

    `save_weights(model, folder, trained)` writes the method's result into a folder (the final one is
    args.out_dir, step files go to out_dir/step-NNNNNN/); `trained` holds the trained tensors, gathered
    from every device, on the CPU.
    """
    out_dir = Path(args.out_dir)
    tokenizer = Tokenizer(args.checkpoint_dir)
    train_data, test_data, data_config = load_prepared(args.data_dir, tokenizer)
    max_seq_length = args.max_seq_length or data_config["max_seq_length"]
    if max_seq_length > model.config.block_size:
        fabric.print(f"Warning: examples of up to {max_seq_length} tokens are cut to the model's context "
                     f"({model.config.block_size})")
        max_seq_length = model.config.block_size
    world_size = fabric.world_size
    per_device = args.global_batch_size // world_size
    if args.global_batch_size % (args.micro_batch_size * world_size):
        raise ValueError(f"global_batch_size ({args.global_batch_size}) must be divisible by micro_batch_size "
                         f"({args.micro_batch_size}) x devices ({world_size})")
    accumulation = per_device // args.micro_batch_size
    steps_per_epoch = len(train_data) / args.global_batch_size
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup_steps = math.ceil(args.warmup_epochs * steps_per_epoch) if args.warmup_epochs is not None else args.warmup_steps
    if warmup_steps >= max_steps:
        fabric.print(f"Warning: warmup ({warmup_steps} steps) is not shorter than the run ({max_steps} steps): "
                     "the learning rate never reaches its peak.")

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_names = {name for name, p in model.named_parameters() if p.requires_grad}
    n_trainable, n_total = num_parameters(model, trainable=True), num_parameters(model)
    fabric.print(f"Trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%)")
    fabric.print(f"{len(train_data):,} training examples, {max_steps} optimizer steps of {args.global_batch_size} "
                 f"examples ({accumulation} micro batches of {args.micro_batch_size} on each of {world_size} devices)")
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer = fabric.setup(model, optimizer)

    state = {"model": model, "optimizer": optimizer, "step": 0, "rng": rng_state()}
    resume_path = find_resume_path(args.resume, out_dir)
    if resume_path is not None:
        load_state(fabric, resume_path, state, trainable_names)
        set_rng_state(state["rng"])
        fabric.print(f"Resumed from {resume_path} at step {state['step']}")
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "hyperparameters.json").write_text(json.dumps(asdict(args), indent=2, default=str))

    def save(step: int, folder: Path) -> None:
        state.update(step=step, rng=rng_state())
        save_state(fabric, out_dir / "state.pth", state, trainable_names)
        if fabric.global_rank == 0:  # the trained tensors as Fabric gathered them, even from FSDP shards
            trained = torch.load(out_dir / "state.pth", mmap=True, weights_only=True)["model"]
            save_weights(model.module, folder, trained)
        fabric.barrier()

    start_step, tokens_seen, start_time = state["step"], 0, time.perf_counter()
    step = start_step
    model.train()
    try:
        for step in range(start_step, max_steps):
            step_rng = rng_state()  # what a Ctrl-C mid-step saves, so the resumed run redoes this step exactly
            lr = learning_rate_at(step, args.learning_rate, warmup_steps, max_steps, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = global_batch_indices(step, len(train_data), args.global_batch_size, args.seed)
            mine = indices[fabric.global_rank * per_device:(fabric.global_rank + 1) * per_device]
            micro_batches = [collate([train_data[i] for i in mine[j:j + args.micro_batch_size]], max_seq_length)
                             for j in range(0, per_device, args.micro_batch_size)]
            tokens_seen += sum(min(len(train_data[i]["input_ids"]), max_seq_length) for i in indices)
            local_label_tokens = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in micro_batches)
            label_tokens = int(fabric.all_reduce(torch.tensor(local_label_tokens, device=fabric.device), reduce_op="sum"))
            step_loss = torch.zeros((), device=fabric.device)
            for j, (input_ids, labels) in enumerate(micro_batches):
                input_ids, labels = fabric.to_device((input_ids, labels))
                with fabric.no_backward_sync(model, enabled=j < accumulation - 1):
                    total = loss_sum(model, input_ids, labels)
                    # DDP averages gradients over devices, so scale by world_size to get the sum / label_tokens
                    fabric.backward(total * world_size / max(label_tokens, 1))
                step_loss += total.detach()
            step_loss = float(fabric.all_reduce(step_loss, reduce_op="sum")) / max(label_tokens, 1)
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"The loss is {step_loss} at step {step + 1}; stopping. The last good checkpoint is in {out_dir}. "
                    "Try a lower --learning_rate, or bf16 instead of 16-bit precision."
                )
            if args.grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            elapsed = time.perf_counter() - start_time
            fabric.log_dict({"loss": step_loss, "lr": lr, "tokens_per_sec": tokens_seen / elapsed}, step=done)
            if done % args.log_interval == 0 or done == max_steps:
                eta = elapsed / (done - start_step) * (max_steps - done)
                fabric.print(f"step {done}/{max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | "
                             f"{tokens_seen / elapsed:,.0f} tokens/s | ETA {format_duration(eta)}")
            if args.eval_interval and done % args.eval_interval == 0 and done < max_steps:
                evaluate_and_report(fabric, model, tokenizer, test_data, args, max_seq_length, done)
            if args.save_interval and done % args.save_interval == 0 and done < max_steps:
                save(done, out_dir / f"step-{done:06d}")
                fabric.print(f"Saved step {done} to {out_dir / f'step-{done:06d}'} and the resumable state")
    except KeyboardInterrupt:
        set_rng_state(step_rng)
        save_state(fabric, out_dir / "state.pth", {**state, "step": step, "rng": step_rng}, trainable_names)
        fabric.print(f"\nInterrupted during step {step + 1}: saved the resumable state {out_dir / 'state.pth'}. "
                     f"Continue with --resume auto.")
        sys.exit(130)

    val_loss = evaluate_and_report(fabric, model, tokenizer, test_data, args, max_seq_length, max_steps)
    save(max_steps, out_dir)
    elapsed = time.perf_counter() - start_time
    summary = {
        "steps": max_steps - start_step, "time_s": elapsed, "tokens_per_sec": tokens_seen / elapsed,
        "time_per_step_s": elapsed / max(1, max_steps - start_step),
        "peak_memory_bytes": peak_memory_bytes(fabric.device), "trainable_parameters": n_trainable,
        "total_parameters": n_total, "final_loss": step_loss if max_steps > start_step else None,
        "val_loss": val_loss, "weights_bytes": weights_size(out_dir),
    }
    fabric.print(
        f"Done: {summary['steps']} steps in {format_duration(elapsed)}, {summary['tokens_per_sec']:,.0f} tokens/s, "
        f"peak memory {format_bytes(summary['peak_memory_bytes'])}, trainable {n_trainable:,} of {n_total:,} "
        f"parameters, weights {format_bytes(summary['weights_bytes'])} in {out_dir}"
    )
    return summary


@torch.no_grad()
def evaluate_and_report(fabric: Fabric, model: nn.Module, tokenizer: Tokenizer, test_data: list, args: TrainArgs,
                        max_seq_length: int, step: int) -> float:
    """Validation loss and perplexity on the first `eval_examples` of test.pt (shared out over devices),
    and one sample answer to `eval_instruction` (LoRA stays unmerged: no drift of the frozen weights)."""
    model.eval()
    subset = test_data[: args.eval_examples]
    mine = subset[fabric.global_rank::fabric.world_size]
    total, count = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device)
    for j in range(0, len(mine), args.micro_batch_size):
        input_ids, labels = fabric.to_device(collate(mine[j:j + args.micro_batch_size], max_seq_length))
        total += loss_sum(model, input_ids, labels)
        count += (labels[:, 1:] != IGNORE_INDEX).sum()
    val_loss = float(fabric.all_reduce(total, reduce_op="sum") / fabric.all_reduce(count, reduce_op="sum").clamp(min=1))
    fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=step)
    fabric.print(f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
    prompt = tokenizer.encode(format_prompt(args.eval_instruction, args.eval_input), bos=True).to(fabric.device)
    new_tokens = min(args.eval_max_new_tokens, model.config.block_size - len(prompt))
    if new_tokens > 0:
        (answer,) = generate(model, [prompt], max_new_tokens=new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
        fabric.print(f"  {(args.eval_instruction + ' ' + args.eval_input).strip()!r} -> {tokenizer.decode(answer)!r}")
    model.train()
    return val_loss


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


def save_state(fabric: Fabric, path: Path, state: dict, trainable_names: set) -> None:
    """Everything an exact resume needs: trainable weights, optimizer, step, RNG. (The data order is a
    function of the step.) Frozen weights are not saved: they are in the base checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state, filter={"model": lambda name, value: name in trainable_names})
    if fabric.global_rank == 0:
        os.replace(tmp, path)
    fabric.barrier()


def load_state(fabric: Fabric, path: Path, state: dict, trainable_names: set) -> None:
    saved = set(torch.load(path, mmap=True, weights_only=True)["model"])
    if saved != trainable_names:
        missing, unexpected = sorted(trainable_names - saved), sorted(saved - trainable_names)
        raise ValueError(f"{path} does not fit this run's trainable parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}. Was it made by another method or with other LoRA targets?")
    fabric.load(path, state, strict=False)


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix == ".pth"
               and f.name != "state.pth")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
