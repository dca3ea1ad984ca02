"""The one training loop, shared by LoRA, LLaMA-Adapter and full finetuning.

What differs between the three methods is which parameters are trainable and which file holds the result;
the scripts in finetune/ set that up in a few lines and call `fit`. Everything else lives here once:

- data: shuffled epochs, one global batch per optimizer step, split into micro batches per device, each one row
  of its examples end to end (packed: no padding computed, see data.pack and LLaMA.forward's `lengths`);
- loss: cross-entropy over label tokens only, normalised by the label tokens of the whole global batch
  (so a micro batch with more response tokens counts more, exactly as one big batch would); or DPO's loss over
  preference pairs (lit_lora/dpo.py), normalised by the pairs: what is minimised is fit's `objective`;
- schedule: linear warmup, then cosine decay, counted in optimizer steps;
- precision: the parameters the optimizer updates are fp32 unless the precision is `*-true` (then everything
  is in that dtype), so mixed precision keeps fp32 master weights as Fabric intends;
- Lightning Fabric for devices, precision and strategies (DDP replicates the model; FSDP shards it Block by
  Block, with torch's `fully_shard`);
- evaluation, progress, CSV logs, checkpoints that resume exactly, Ctrl-C, NaN checks.

Exact resume. Everything random in a step (dropout) is drawn from a generator seeded with (seed, process,
step), and the data order is a function of (seed, step): a resumed run needs only the number of completed
steps, the trainable weights and the optimizer state, and equals an uninterrupted run bit for bit (on as many
devices, with the same micro batch size: each device draws its own masks, one micro batch after another).

The flags (`TrainArgs`) and the checks of the data they name live in lit_lora/train_args.py.
"""

import hashlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.data import IGNORE_INDEX, collate, global_batch_indices, pack
from lit_lora.devices import checkpoint_activations, dtype_from_precision, is_sharded, reshard
from lit_lora.generation import generate
from lit_lora.prompts import encode_prompt, format_prompt, response_stop_ids
from lit_lora.progress import Progress
from lit_lora.resume import interrupt_held, run_identity, save_checkpoint, save_on_interrupt, start_or_resume, unlock_out_dir
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_args import TrainArgs, load_training_data

if TYPE_CHECKING:  # named in annotations only: Lightning is imported by the scripts that train
    from lightning.fabric import Fabric


# ---------------------------------------------------------------------------------------------------------
# The loop


class Objective(NamedTuple):
    """What the loop minimises: `loss(model, input_ids, labels, lengths)` gives a micro batch's summed loss and
    figures summed alike (a dict), both divided by the global batch's `units(labels, lengths)`: label tokens for the
    cross-entropy of supervised finetuning, pairs for DPO (lit_lora/dpo.py), whose records are preference pairs."""
    loss: Callable
    units: Callable
    pairs: bool = False


SUPERVISED = Objective(loss=lambda model, input_ids, labels, lengths: (loss_sum(model, input_ids, labels, lengths), {}),
                       units=lambda labels, lengths: int((labels[:, 1:] != IGNORE_INDEX).sum()))


def fit(fabric: "Fabric", model: nn.Module, args: TrainArgs, save_weights: Callable[[nn.Module, Path, dict], None],
        objective: Objective = SUPERVISED) -> dict:
    """Train the parameters of `model` that require grad; return the run's figures.

    `save_weights(model, folder, trained)` writes the method's result into a folder (the final one is
    args.out_dir, step files go to out_dir/step-NNNNNN/); `trained` holds the trained tensors, gathered
    from every device, on the CPU.
    """
    out_dir, rank = Path(args.out_dir), fabric.global_rank
    tokenizer = Tokenizer(args.checkpoint_dir)
    train_data, test_data, max_seq_length, prompt_format = load_training_data(fabric, args, tokenizer,
                                                                              model.config.block_size, objective.pairs)
    max_steps, warmup_steps = plan_steps(fabric, args, len(train_data))
    model = model.to(dtype_from_precision(args.precision))  # fp32 master weights unless *-true (module docstring)
    model.prompt_format = prompt_format  # the format it learns: evaluated in, and recorded with the weights
    if args.activation_checkpointing:
        checkpoint_activations(model)
    run = run_identity(args, model)  # what a resumed run must share with the saved one
    model = fabric.setup_module(model)  # to the device; wrapped for DDP, or sharded for FSDP
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay))
    sharded = is_sharded(fabric)
    progress = Progress(fabric, model, args, max_steps)
    unit = "preference pairs" if objective.pairs else "examples"
    fabric.print(f"{len(train_data):,} training {unit}, {max_steps} optimizer steps of {args.global_batch_size} "
                 f"{unit} ({args.global_batch_size // fabric.world_size // args.micro_batch_size} micro batches of "
                 f"{args.micro_batch_size} on each of {fabric.world_size} devices)")
    start_step = start_or_resume(fabric, args, model.module, optimizer.optimizer, run, sharded)
    progress.begin(start_step)

    def save(step: int, folder: Path) -> None:
        save_checkpoint(fabric, model.module, optimizer.optimizer, step, run, folder, out_dir, save_weights)

    completed, loss = start_step, None
    model.train()
    try:
        for step in range(start_step, max_steps):
            step_start = time.perf_counter()
            torch.manual_seed(step_seed(args.seed, rank, step))  # this step's dropout masks on this process
            lr = learning_rate_at(step, args.learning_rate, warmup_steps, max_steps, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, examples, positions = micro_batches_of_step(step, train_data, args, fabric, max_seq_length)

            loss, figures = forward_backward(fabric, model, micro_batches, sharded, objective)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"The loss is {loss} at step {step + 1}; stopping. The last good checkpoint is in {out_dir}. "
                    "Try a lower --learning_rate, or bf16 instead of 16-bit precision.")
            with interrupt_held():  # every parameter takes the step, or none does
                if args.grad_clip > 0:
                    fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                completed = step + 1

            progress.log(completed, loss, lr, time.perf_counter() - step_start, examples, positions, figures)
            if args.eval_interval and completed % args.eval_interval == 0 and completed < max_steps:
                evaluate(fabric, model, tokenizer, test_data, args, max_seq_length, completed, objective)
            if args.save_interval and completed % args.save_interval == 0 and completed < max_steps:
                save(completed, out_dir / f"step-{completed:06d}")
                fabric.print(f"Saved step {completed} to {out_dir / f'step-{completed:06d}'} and the resumable state")
        val_loss = evaluate(fabric, model, tokenizer, test_data, args, max_seq_length, max_steps, objective)
    except KeyboardInterrupt:  # the last completed step is saved, even if it was the run's last
        save_on_interrupt(fabric, model.module, optimizer.optimizer, completed, run, out_dir, sharded)
    with interrupt_held():  # the final files are written whole; a Ctrl-C meanwhile waits for them
        save(max_steps, out_dir)
    unlock_out_dir(out_dir)
    return progress.summary(final_loss=loss, val_loss=val_loss, out_dir=out_dir)


def forward_backward(fabric: "Fabric", model: nn.Module, micro_batches: list, sync_every_micro_batch: bool,
                     objective: Objective = SUPERVISED) -> tuple[float, dict]:
    """Accumulate the gradient of one optimizer step over its micro batches; return the step's loss and figures.

    The loss is the sum over the *global* batch divided by its units (label tokens: the cross-entropy over every
    label token; pairs for DPO), so every unit weighs the same however the batch is split into micro batches and
    devices. DDP averages gradients over devices, hence the factor world_size. DDP synchronises gradients only after
    the last micro batch; FSDP must reduce-scatter after every one, or each device would hold the whole, unsharded
    gradient meanwhile.
    """
    local_units = sum(objective.units(labels, lengths) for _, labels, lengths in micro_batches)
    units = int(fabric.all_reduce(torch.tensor(local_units, device=fabric.device), reduce_op="sum"))
    sums = {}  # the loss, then the objective's figures, summed over the micro batches
    for j, (input_ids, labels, lengths) in enumerate(micro_batches):
        input_ids, labels = fabric.to_device((input_ids, labels))
        last = j == len(micro_batches) - 1
        with fabric.no_backward_sync(model, enabled=not (last or sync_every_micro_batch)):
            total, figures = objective.loss(model, input_ids, labels, lengths)
            fabric.backward(total * fabric.world_size / units)
        for name, value in {"loss": total, **figures}.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
    totals = fabric.all_reduce(torch.stack(list(sums.values())), reduce_op="sum") / units  # one reduction for all
    figures = dict(zip(sums, totals.tolist()))
    return figures.pop("loss"), figures


def loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
             lengths: Optional[list[int]] = None) -> torch.Tensor:
    """Summed cross-entropy of predicting token t+1 from positions <= t, over label tokens (not -100)."""
    return -label_log_probs(model, input_ids, labels, lengths).sum()


def label_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    lengths: Optional[list[int]] = None) -> torch.Tensor:
    """log p(label | the tokens before it) of every label token (not -100), row by row: (N,).

    Logits are computed only at the positions that predict a label: with the prompt masked, that skips
    the vocabulary projection (and its gradient) for every prompt token. `lengths`: a packed row (data.pack).
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    predicts_label = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # (B, T); the last position predicts nothing
    logits = model(input_ids, logits_at=predicts_label, lengths=lengths)  # (N, vocab)
    return -F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="none")


@torch.no_grad()
def evaluate(fabric: "Fabric", model: nn.Module, tokenizer: Tokenizer, test_data: list, args: TrainArgs,
             max_seq_length: int, step: int, objective: Objective = SUPERVISED) -> Optional[float]:
    """Validation loss (with perplexity, or the objective's figures) on the first `eval_examples` of test.pt (shared
    out over devices), and one sample answer to `eval_instruction` (LoRA stays unmerged: no drift of the frozen
    weights). None when there is no test data."""
    model.eval()
    val_loss = None
    subset = test_data[: args.eval_examples]
    if subset:
        local_examples = subset[fabric.global_rank::fabric.world_size]
        sums, units = {}, 0
        for j in range(0, len(local_examples), args.micro_batch_size):
            input_ids, labels, lengths = micro_batch(local_examples[j:j + args.micro_batch_size], args, max_seq_length)
            input_ids, labels = fabric.to_device((input_ids, labels))
            total, figures = objective.loss(model, input_ids, labels, lengths)
            for name, value in {"loss": total, **figures}.items():
                sums[name] = sums.get(name, 0.0) + value
            units += objective.units(labels, lengths)
        totals = fabric.all_reduce(torch.stack(list(sums.values())), reduce_op="sum")
        figures = dict(zip(sums, (totals / fabric.all_reduce(torch.tensor(float(units), device=fabric.device), reduce_op="sum")).tolist()))
        val_loss = figures.pop("loss")
        figures = figures or {"ppl": math.exp(min(val_loss, 50))}  # cross-entropy: its perplexity
        fabric.log_dict({"val_loss": val_loss, **{f"val_{name}": value for name, value in figures.items()}}, step=step)
        fabric.print(f"step {step} | val loss {val_loss:.4f} | "
                     + " | ".join(f"val {name} {value:.4f}" for name, value in figures.items()))
    prompt_format = model.module.prompt_format  # what it learns
    style, system_prompt = prompt_format["style"], prompt_format["system_prompt"]
    prompt = encode_prompt(tokenizer, format_prompt(args.eval_instruction, args.eval_input, style, tokenizer,
                                                    system_prompt), style).to(fabric.device)
    new_tokens = min(args.eval_max_new_tokens, model.config.block_size - len(prompt))
    if new_tokens > 0:
        (answer,) = generate(model, [prompt], max_new_tokens=new_tokens, temperature=0.0,
                             stop_ids=response_stop_ids(tokenizer, style), vocab_size=tokenizer.vocab_size)
        fabric.print(f"  {(args.eval_instruction + ' ' + args.eval_input).strip()!r} -> {tokenizer.decode(answer)!r}")
    reshard(model.module)
    model.train()
    return val_loss


# ---------------------------------------------------------------------------------------------------------
# Data, schedule, randomness


def plan_steps(fabric: "Fabric", args: TrainArgs, num_examples: int) -> tuple[int, int]:
    """The run's optimizer steps and warmup steps (from --epochs and --warmup_epochs unless given in steps)."""
    steps_per_epoch = num_examples / args.global_batch_size
    max_steps = args.max_steps if args.max_steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup_steps = math.ceil(args.warmup_epochs * steps_per_epoch) if args.warmup_epochs is not None else args.warmup_steps
    if warmup_steps >= max_steps:
        fabric.print(f"Warning: warmup ({warmup_steps} steps) is not shorter than the run ({max_steps} steps): "
                     "the learning rate never reaches its peak.")
    return max_steps, warmup_steps


def micro_batches_of_step(step: int, train_data: list, args: TrainArgs, fabric: "Fabric",
                          max_seq_length: int) -> tuple[list, list, int]:
    """This process's share of the step's global batch as micro batches (packed rows, or right-padded), and for
    the progress figures the (tokens, label tokens) of each example of the global batch and the positions its
    micro batches compute, padding included."""
    indices = global_batch_indices(step, len(train_data), args.global_batch_size, args.seed)
    per_device = args.global_batch_size // fabric.world_size
    local_indices = indices[fabric.global_rank * per_device:(fabric.global_rank + 1) * per_device]
    micro_batches = [micro_batch([train_data[i] for i in local_indices[j:j + args.micro_batch_size]], args,
                                 max_seq_length) for j in range(0, per_device, args.micro_batch_size)]
    # for the progress figures: (tokens, label tokens) of every sequence, grouped as the micro batches hold them
    groups = [[(min(len(e["input_ids"]), max_seq_length), int((e["labels"][1:max_seq_length] != IGNORE_INDEX).sum()))
               for e in sequences([train_data[i] for i in indices[j:j + args.micro_batch_size]])]
              for j in range(0, len(indices), args.micro_batch_size)]
    examples = [example for group in groups for example in group]
    positions = sum(sum(t for t, _ in g) if args.packing else len(g) * max(t for t, _ in g) for g in groups)
    return micro_batches, examples, positions


def sequences(records: list[dict]) -> list[dict]:
    """What a micro batch computes: its examples, or for preference pairs (lit_lora/dpo.py) every chosen answer,
    then every rejected one, so that the policy reads both in one batch."""
    if "chosen" not in records[0]:
        return records
    return [pair["chosen"] for pair in records] + [pair["rejected"] for pair in records]


def micro_batch(examples: list[dict], args: TrainArgs, max_seq_length: int) -> tuple:
    """(input_ids, labels, lengths): one packed row (data.pack), or right-padded rows (data.collate; lengths None)."""
    examples = sequences(examples)
    return pack(examples, max_seq_length) if args.packing else (*collate(examples, max_seq_length), None)


def learning_rate_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay from max_lr to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of everything random (dropout) in optimizer step `step` on process `rank`: different for every
    (seed, rank, step), so each device draws its own dropout masks, and a resumed run draws exactly the masks
    of an uninterrupted one with no random state to save."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1
