"""The one training loop, shared by LoRA, LLaMA-Adapter and full finetuning.

What differs between the three methods is which parameters are trainable and which file holds the result;
the scripts in finetune/ set that up in a few lines and call `fit`. Everything else lives here once:

- data: shuffled epochs, one global batch per optimizer step, split into micro batches per device;
- loss: cross-entropy over label tokens only, normalised by the label tokens of the whole global batch
  (so a micro batch with more response tokens counts more, exactly as one big batch would);
- schedule: linear warmup, then cosine decay, counted in optimizer steps;
- precision: the parameters the optimizer updates are fp32 unless the precision is `*-true` (then everything
  is in that dtype), so mixed precision keeps fp32 master weights as Fabric intends;
- Lightning Fabric for devices, precision and strategies (DDP replicates the model; FSDP shards it Block by
  Block, with torch's `fully_shard`);
- evaluation, progress, CSV logs, checkpoints that resume exactly, Ctrl-C, NaN checks.

Exact resume. Everything random in a step (dropout) is drawn from a generator seeded with (seed, process,
step), and the data order is a function of (seed, step): a resumed run needs only the number of completed
steps, the trainable weights and the optimizer state, and equals an uninterrupted run bit for bit.
"""

import hashlib
import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lit_lora.data import IGNORE_INDEX, collate, format_prompt, load_prepared
from lit_lora.generation import generate
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import (atomic_folder, atomic_save, atomic_write, check_flag, default_precision,
                            dtype_from_precision, format_bytes, num_parameters, peak_memory_bytes)


@dataclass
class TrainArgs:
    """Hyperparameters shared by every finetuning script (each script sets its method's defaults).

    Args:
        checkpoint_dir: The base model's folder (lit_model.pth, model_config.json, tokenizer.model).
        data_dir: Prepared data (train.pt, test.pt) made by a prepare_data/ script.
        out_dir: Where the finetuned weights, step files, resumable state and logs go.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed; default bf16-true on a GPU that supports it, else
            32-true. Under 32-true and *-mixed the trained parameters (and the frozen ones) are fp32; under
            bf16-true everything is bf16.
        devices: Devices per node (GPUs, or CPU processes).
        num_nodes: Machines.
        strategy: auto, ddp or fsdp (see howto/multi_gpu.md for what each does to memory).
        seed: Seeds the initialisation, the data order and every dropout mask.
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
        eval_max_new_tokens: Length of that sample (0: no sample).
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

    def __post_init__(self):
        for name in ("devices", "num_nodes", "global_batch_size", "micro_batch_size", "log_interval", "eval_examples"):
            check_flag(self, name, getattr(self, name) >= 1, "must be at least 1")
        for name in ("seed", "weight_decay", "warmup_steps", "min_lr", "grad_clip", "eval_interval", "save_interval",
                     "eval_max_new_tokens"):
            check_flag(self, name, getattr(self, name) >= 0, "must not be negative")
        check_flag(self, "learning_rate", self.learning_rate > 0, "must be positive")
        check_flag(self, "min_lr", self.min_lr <= self.learning_rate,
                   f"must not exceed --learning_rate ({self.learning_rate}): the cosine decays from one to the other")
        check_flag(self, "epochs", self.epochs > 0, "must be positive (or give --max_steps)")
        check_flag(self, "max_steps", self.max_steps is None or self.max_steps >= 1,
                   "must be at least 1 (leave it out to train for --epochs)")
        check_flag(self, "warmup_epochs", self.warmup_epochs is None or self.warmup_epochs >= 0, "must not be negative")
        check_flag(self, "max_seq_length", self.max_seq_length is None or self.max_seq_length >= 2,
                   "must be at least 2 (a prompt token and a response token; leave it out to use the prepared length)")
        processes = self.devices * self.num_nodes
        check_flag(self, "global_batch_size", self.global_batch_size % (self.micro_batch_size * processes) == 0,
                   f"must be divisible by --micro_batch_size ({self.micro_batch_size}) x devices ({processes}): "
                   "each optimizer step is a whole number of micro batches on every device")


# ---------------------------------------------------------------------------------------------------------
# Starting Fabric


def launch_fabric(args: TrainArgs, multi_device_strategy: str = "ddp", activation_checkpointing: bool = False) -> Fabric:
    """Start Fabric (and, for several devices, the other processes) before anything is built.

    `--strategy auto` on several devices means `multi_device_strategy`: DDP (a replica per device) for LoRA
    and Adapter, whose weights fit on one device; FSDP for full finetuning, sharding weights, gradients and
    optimizer state Block by Block.
    """
    args.out_dir = Path(args.out_dir)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out_dir {args.out_dir} is a file, not a folder: choose another --out_dir")
    args.precision = args.precision or default_precision()  # recorded as run, in hyperparameters.json and state.pth
    strategy = args.strategy
    if strategy == "auto" and args.devices * args.num_nodes > 1:
        strategy = multi_device_strategy
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(partial_shard(activation_checkpointing), save_distributed_checkpoint=False,
                                         data_parallel_size=args.devices * args.num_nodes, tensor_parallel_size=1)
    fabric = Fabric(devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, precision=args.precision,
                    loggers=make_loggers(args.out_dir))
    fabric.launch()
    fabric.seed_everything(args.seed)  # the same initialisation (LoRA's A, the adapter's prompts) on every process
    return fabric


def partial_shard(activation_checkpointing: bool) -> Callable:
    """FSDP (torch's `fully_shard`): each Block's parameters are split over the devices and gathered only while
    that Block computes, forward and backward; gradients are reduce-scattered back into shards."""

    def shard(model: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh["data_parallel"]
        for block in model.blocks:
            if activation_checkpointing:
                checkpoint(block)  # keep only the Block's input; recompute the rest in the backward pass
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the embedding, final norm and lm_head
        return model

    return shard


def make_loggers(out_dir: Path) -> list:
    loggers = [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=1)]  # logs/version_N: a resumed run adds one
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    except (ImportError, ModuleNotFoundError):  # TensorBoard is optional
        pass
    return loggers


# ---------------------------------------------------------------------------------------------------------
# The loop


def fit(fabric: Fabric, model: nn.Module, args: TrainArgs,
        save_weights: Callable[[nn.Module, Path, dict], None]) -> dict:
    """Train the parameters of `model` that require grad; return the run's figures.

    `save_weights(model, folder, trained)` writes the method's result into a folder (the final one is
    args.out_dir, step files go to out_dir/step-NNNNNN/); `trained` holds the trained tensors, gathered
    from every device, on the CPU.
    """
    out_dir = Path(args.out_dir)
    tokenizer = Tokenizer(args.checkpoint_dir)
    train_data, test_data, max_seq_length = load_training_data(fabric, args, tokenizer, model.config.block_size)
    world_size, rank = fabric.world_size, fabric.global_rank
    per_device = args.global_batch_size // world_size
    accumulation = per_device // args.micro_batch_size
    steps_per_epoch = len(train_data) / args.global_batch_size
    max_steps = args.max_steps if args.max_steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup_steps = math.ceil(args.warmup_epochs * steps_per_epoch) if args.warmup_epochs is not None else args.warmup_steps
    if warmup_steps >= max_steps:
        fabric.print(f"Warning: warmup ({warmup_steps} steps) is not shorter than the run ({max_steps} steps): "
                     "the learning rate never reaches its peak.")

    model = model.to(dtype_from_precision(args.precision))  # fp32 master weights unless *-true (module docstring)
    n_trainable, n_total = num_parameters(model, trainable=True), num_parameters(model)
    fabric.print(f"Trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%)")
    fabric.print(f"{len(train_data):,} training examples, {max_steps} optimizer steps of {args.global_batch_size} "
                 f"examples ({accumulation} micro batches of {args.micro_batch_size} on each of {world_size} devices)")
    run = run_identity(args, model)  # what a resumed run must share with the saved one
    model = fabric.setup_module(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    optimizer = fabric.setup_optimizers(optimizer)
    sharded = isinstance(fabric.strategy, ModelParallelStrategy)

    start_step = 0
    resume_path = find_resume_path(args.resume, out_dir)
    if resume_path is not None:
        start_step = load_state(resume_path, model.module, optimizer.optimizer, run, sharded)
        fabric.print(f"Resumed from {resume_path} after step {start_step}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        atomic_write(out_dir / "hyperparameters.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(asdict(args), indent=2, default=str)))

    def save(step: int, folder: Path) -> None:
        save_checkpoint(fabric, model.module, optimizer.optimizer, step, run, folder, out_dir, save_weights)

    completed, loss, tokens_seen, start_time = start_step, None, 0, time.perf_counter()
    model.train()
    try:
        for step in range(start_step, max_steps):
            step_start = time.perf_counter()
            torch.manual_seed(step_seed(args.seed, rank, step))  # this step's dropout masks on this process
            lr = learning_rate_at(step, args.learning_rate, warmup_steps, max_steps, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = global_batch_indices(step, len(train_data), args.global_batch_size, args.seed)
            my_indices = indices[rank * per_device:(rank + 1) * per_device]
            micro_batches = [collate([train_data[i] for i in my_indices[j:j + args.micro_batch_size]], max_seq_length)
                             for j in range(0, per_device, args.micro_batch_size)]
            step_tokens = sum(min(len(train_data[i]["input_ids"]), max_seq_length) for i in indices)

            loss = forward_backward(fabric, model, micro_batches, sync_every_micro_batch=sharded)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"The loss is {loss} at step {step + 1}; stopping. The last good checkpoint is in {out_dir}. "
                    "Try a lower --learning_rate, or bf16 instead of 16-bit precision."
                )
            with interrupt_held():  # every parameter takes the step, or none does
                if args.grad_clip > 0:
                    fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                completed = step + 1

            step_time, tokens_seen = time.perf_counter() - step_start, tokens_seen + step_tokens
            elapsed = time.perf_counter() - start_time
            fabric.log_dict({"loss": loss, "lr": lr, "step_time_s": step_time, "step_tokens": step_tokens,
                             "tokens_per_sec": tokens_seen / elapsed}, step=completed)
            if completed % args.log_interval == 0 or completed == max_steps:
                eta = elapsed / (completed - start_step) * (max_steps - completed)
                fabric.print(f"step {completed}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                             f"{tokens_seen / elapsed:,.0f} tokens/s | ETA {format_duration(eta)}")
            if args.eval_interval and completed % args.eval_interval == 0 and completed < max_steps:
                evaluate(fabric, model, tokenizer, test_data, args, max_seq_length, completed)
            if args.save_interval and completed % args.save_interval == 0 and completed < max_steps:
                save(completed, out_dir / f"step-{completed:06d}")
                fabric.print(f"Saved step {completed} to {out_dir / f'step-{completed:06d}'} and the resumable state")
    except KeyboardInterrupt:
        save_on_interrupt(fabric, model.module, optimizer.optimizer, completed, run, out_dir, sharded)

    val_loss = evaluate(fabric, model, tokenizer, test_data, args, max_seq_length, max_steps)
    save(max_steps, out_dir)
    elapsed = time.perf_counter() - start_time
    summary = {
        "steps": max_steps - start_step, "time_s": elapsed, "tokens_per_sec": tokens_seen / elapsed,
        "time_per_step_s": elapsed / max(1, max_steps - start_step),
        "peak_memory_bytes": peak_memory_bytes(fabric.device), "trainable_parameters": n_trainable,
        "total_parameters": n_total, "final_loss": loss,
        "val_loss": val_loss, "weights_bytes": weights_size(out_dir),
    }
    fabric.print(
        f"Done: {summary['steps']} steps in {format_duration(elapsed)}, {summary['tokens_per_sec']:,.0f} tokens/s, "
        f"peak memory {format_bytes(summary['peak_memory_bytes'])}, trainable {n_trainable:,} of {n_total:,} "
        f"parameters, weights {format_bytes(summary['weights_bytes'])} in {out_dir}"
    )
    return summary


def forward_backward(fabric: Fabric, model: nn.Module, micro_batches: list, sync_every_micro_batch: bool) -> float:
    """Accumulate the gradient of one optimizer step over its micro batches; return the step's loss.

    The loss is the sum of cross-entropies over the label tokens of the *global* batch divided by their
    number, so every label token weighs the same however the batch is split into micro batches and devices.
    DDP averages gradients over devices, hence the factor world_size. DDP synchronises gradients only after the
    last micro batch; FSDP must reduce-scatter after every one, or each device would hold the whole, unsharded
    gradient meanwhile.
    """
    local_label_tokens = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in micro_batches)
    label_tokens = int(fabric.all_reduce(torch.tensor(local_label_tokens, device=fabric.device), reduce_op="sum"))
    step_loss = torch.zeros((), device=fabric.device)
    for j, (input_ids, labels) in enumerate(micro_batches):
        input_ids, labels = fabric.to_device((input_ids, labels))
        last = j == len(micro_batches) - 1
        with fabric.no_backward_sync(model, enabled=not (last or sync_every_micro_batch)):
            total = loss_sum(model, input_ids, labels)
            fabric.backward(total * fabric.world_size / label_tokens)
        step_loss += total.detach()
    return float(fabric.all_reduce(step_loss, reduce_op="sum")) / label_tokens


def loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token t+1 from positions <= t, over label tokens (not -100).

    Logits are computed only at the positions that predict a label: with the prompt masked, that skips
    the vocabulary projection (and its gradient) for every prompt token.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    predicts_label = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # (B, T); the last position predicts nothing
    logits = model(input_ids, logits_at=predicts_label)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")


@torch.no_grad()
def evaluate(fabric: Fabric, model: nn.Module, tokenizer: Tokenizer, test_data: list, args: TrainArgs,
             max_seq_length: int, step: int) -> Optional[float]:
    """Validation loss and perplexity on the first `eval_examples` of test.pt (shared out over devices),
    and one sample answer to `eval_instruction` (LoRA stays unmerged: no drift of the frozen weights).
    None when there is no test data."""
    model.eval()
    val_loss = None
    subset = test_data[: args.eval_examples]
    if subset:
        mine = subset[fabric.global_rank::fabric.world_size]
        total, count = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device)
        for j in range(0, len(mine), args.micro_batch_size):
            input_ids, labels = fabric.to_device(collate(mine[j:j + args.micro_batch_size], max_seq_length))
            total += loss_sum(model, input_ids, labels)
            count += (labels[:, 1:] != IGNORE_INDEX).sum()
        val_loss = float(fabric.all_reduce(total, reduce_op="sum") / fabric.all_reduce(count, reduce_op="sum"))
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=step)
        fabric.print(f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f}")
    prompt = tokenizer.encode(format_prompt(args.eval_instruction, args.eval_input), bos=True).to(fabric.device)
    new_tokens = min(args.eval_max_new_tokens, model.config.block_size - len(prompt))
    if new_tokens > 0:
        (answer,) = generate(model, [prompt], max_new_tokens=new_tokens, temperature=0.0, eos_id=tokenizer.eos_id,
                             vocab_size=tokenizer.vocab_size)  # never an id the tokenizer cannot decode
        fabric.print(f"  {(args.eval_instruction + ' ' + args.eval_input).strip()!r} -> {tokenizer.decode(answer)!r}")
    reshard(model.module)
    model.train()
    return val_loss


def reshard(module: nn.Module) -> None:
    """After forward passes with no backward pass (evaluation), FSDP keeps the outermost module's weights
    gathered, expecting the backward next: split them into shards again, as training left them."""
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


# ---------------------------------------------------------------------------------------------------------
# Data, schedule, randomness


def load_training_data(fabric: Fabric, args: TrainArgs, tokenizer: Tokenizer, block_size: int) -> tuple[list, list, int]:
    """train and test examples, and the length they are cut to. An example whose labels are all cut away
    (its prompt fills max_seq_length) would train nothing: it is left out, and a run with none left is an error."""
    train_data, test_data, data_config = load_prepared(args.data_dir, tokenizer)
    max_seq_length = args.max_seq_length if args.max_seq_length is not None else data_config["max_seq_length"]
    if max_seq_length > block_size:
        fabric.print(f"Warning: examples of up to {max_seq_length} tokens are cut to the model's context ({block_size})")
        max_seq_length = block_size

    def has_labels(example: dict) -> bool:  # position t predicts token t + 1, so a label at 1..max_seq_length-1
        return bool((example["labels"][1:max_seq_length] != IGNORE_INDEX).any())

    kept_train, kept_test = [e for e in train_data if has_labels(e)], [e for e in test_data if has_labels(e)]
    if not kept_train:
        prompt = min(int((e["labels"] == IGNORE_INDEX).sum()) for e in train_data)
        raise ValueError(f"No training example of {args.data_dir} has a response token within --max_seq_length "
                         f"{max_seq_length} (the shortest prompt is {prompt} tokens): nothing would be learned. "
                         "Raise --max_seq_length, or prepare the data again with a larger one.")
    for name, kept, data in (("training", kept_train, train_data), ("test", kept_test, test_data)):
        if len(kept) < len(data):
            fabric.print(f"Warning: {len(data) - len(kept)} of {len(data)} {name} examples have no response token "
                         f"within {max_seq_length} tokens and are left out")
    if not kept_test:
        fabric.print(f"Note: {args.data_dir} has no test examples: no validation loss will be computed")
    return kept_train, kept_test, max_seq_length


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


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of everything random (dropout) in optimizer step `step` on process `rank`: different for every
    (seed, rank, step), so each device draws its own dropout masks, and a resumed run draws exactly the masks
    of an uninterrupted one with no random state to save."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1


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


# ---------------------------------------------------------------------------------------------------------
# Saving and resuming

# The flags a resumed run may change: where things are, how the work is split, what is printed and saved.
# Every other flag (the seed, batch size, schedule, precision, the method's hyperparameters) decides the
# run's result, and resuming with another value is refused.
RESUME_MAY_CHANGE = {"checkpoint_dir", "data_dir", "out_dir", "devices", "num_nodes", "strategy", "micro_batch_size",
                     "eval_interval", "eval_examples", "eval_instruction", "eval_input", "eval_max_new_tokens",
                     "save_interval", "log_interval", "resume"}


def run_identity(args: TrainArgs, model: nn.Module) -> dict:
    """What decides a run's result: every flag but RESUME_MAY_CHANGE, the training data's sha256 and the
    base weights' fingerprint (paths may move; contents may not)."""
    identity = {name: value for name, value in asdict(args).items() if name not in RESUME_MAY_CHANGE}
    identity["data"] = hashlib.sha256((Path(args.data_dir) / "train.pt").read_bytes()).hexdigest()
    identity["base_weights"] = getattr(model, "base_fingerprint", None)
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


def save_checkpoint(fabric: Fabric, module: nn.Module, optimizer: torch.optim.Optimizer, step: int, run: dict,
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


def save_on_interrupt(fabric: Fabric, module: nn.Module, optimizer: torch.optim.Optimizer, completed: int, run: dict,
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


def load_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, run: dict, sharded: bool) -> int:
    """Restore the trainable weights and the optimizer from `path`, after checking that the saved run is this
    run; return the number of completed steps."""
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"--resume {path}: not a resumable state written by lit-lora ({e})") from None
    if not isinstance(state, dict) or "run" not in state:
        raise ValueError(f"--resume {path}: not a resumable state written by this version of lit-lora; start afresh")
    for name in sorted(set(run) | set(state["run"])):
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
    return state["step"]


def remove_leftovers(out_dir: Path) -> None:
    """Temporary files and folders that a killed run can leave in out_dir (.NAME.XXXX.tmp from an atomic write,
    .NAME.old-XXXX from a folder swap): everything in them is rewritten from the resumable state."""
    for path in list(out_dir.glob(".*.tmp")) + list(out_dir.glob(".*.old-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix == ".pth"
               and f.name != "state.pth")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
