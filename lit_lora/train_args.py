"""What a training run is given, checked before it starts: the flags every finetuning script shares (`TrainArgs`),
and the prepared data they point at (`load_training_data`). The periphery of lit_lora/train.py's loop: a value that
means nothing stops the script while its flags are parsed, with one line naming the flag.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

from lit_lora.cli import check_flag, config_flags
from lit_lora.data import IGNORE_INDEX, load_prepared, prepared_prompt_format, read_prepare_config
from lit_lora.preference import load_pairs
from lit_lora.quantize import check_quantize
from lit_lora.resume import refuse_to_start_over
from lit_lora.tokenizer import Tokenizer

if TYPE_CHECKING:  # named in annotations only: Lightning is imported by the scripts that train
    from lightning.fabric import Fabric


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
        packing: Run each micro batch as one row holding its examples end to end, each example's positions and
            attention kept to itself: the same loss as right-padded rows (to rounding), without computing the padding.
            false: right-padded rows. May change on resume.
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
            Without it, a run whose out_dir holds a saved state is refused (see --overwrite).
        overwrite: Start a new run in an out_dir that holds the saved state of an earlier one, which the new run's
            first save replaces.
        activation_checkpointing: Keep only each Block's input in the forward pass and compute its activations again
            in the backward pass: less memory, about one more forward pass of time. May change on resume.
        quantize: Store the frozen weights of the Blocks in 4 bits (QLoRA, see howto/finetune_qlora.md): bnb.nf4
            (4-bit NormalFloat), or bnb.nf4-dq (its scales quantized too); null: in the precision's dtype. Needs
            bitsandbytes: pip install -e '.[quantize]'.
    """

    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf")  # what README's download and convert_hf commands create
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
    packing: bool = True
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
    overwrite: bool = False
    activation_checkpointing: bool = False
    quantize: Optional[str] = None

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
        check_flag(self, "overwrite", not (self.overwrite and self.resume not in (False, None)),
                   "cannot go with --resume: one continues the saved run, the other starts over")
        refuse_to_start_over(self.out_dir, self.resume, self.overwrite)  # a rerun never discards saved steps silently
        with config_flags():
            check_quantize(self.quantize)  # a known mode, and bitsandbytes installed
        check_flag(self, "quantize", self.quantize is None or self.strategy != "fsdp",
                   "not with --strategy fsdp, which would shard the packed 4-bit weights apart from their scales; "
                   "use one device or --strategy ddp")


def load_training_data(fabric: "Fabric", args: TrainArgs, tokenizer: Tokenizer, block_size: int,
                       pairs: bool = False) -> tuple[list, list, int, dict]:
    """train and test examples (preference pairs if `pairs`: DPO), the length they are cut to, and the prompt format
    they were prepared in. An example whose labels are all cut away (its prompt fills max_seq_length) would train
    nothing: it is left out (a pair, when either answer is), and a run with none left is an error."""
    check_data_kind(args.data_dir, pairs)
    if pairs:
        train_data, test_data, data_config = load_pairs(args.data_dir, tokenizer)
    else:
        train_data, test_data, data_config = load_prepared(args.data_dir, tokenizer)
    max_seq_length = args.max_seq_length if args.max_seq_length is not None else data_config["max_seq_length"]
    if max_seq_length > block_size:
        fabric.print(f"Warning: examples of up to {max_seq_length} tokens are cut to the model's context ({block_size})")
        max_seq_length = block_size

    def has_labels(example: dict) -> bool:  # position t predicts token t + 1, so a label at 1..max_seq_length-1
        if "chosen" in example:
            return has_labels(example["chosen"]) and has_labels(example["rejected"])
        return bool((example["labels"][1:max_seq_length] != IGNORE_INDEX).any())

    kept_train, kept_test = [e for e in train_data if has_labels(e)], [e for e in test_data if has_labels(e)]
    if not kept_train and pairs:
        raise ValueError(f"No preference pair of {args.data_dir} has both answers within --max_seq_length "
                         f"{max_seq_length}: raise it, or prepare the data again with a larger one.")
    if not kept_train:
        if not any((e["labels"][1:] != IGNORE_INDEX).any() for e in train_data):
            raise ValueError(f"No training example of {args.data_dir} has a label token: every label is {IGNORE_INDEX} "
                             "(masked), so nothing would be learned. Prepare the data again, with responses.")
        prompt = min(int((e["labels"] != IGNORE_INDEX).nonzero()[0]) for e in train_data
                     if (e["labels"] != IGNORE_INDEX).any())
        raise ValueError(f"No training example of {args.data_dir} has a response token within --max_seq_length "
                         f"{max_seq_length} (the shortest prompt is {prompt} tokens): nothing would be learned. "
                         "Raise --max_seq_length, or prepare the data again with a larger one.")
    for name, kept, data in (("training", kept_train, train_data), ("test", kept_test, test_data)):
        if len(kept) < len(data):
            fabric.print(f"Warning: {len(data) - len(kept)} of {len(data)} {name} examples have no response token "
                         f"within {max_seq_length} tokens and are left out")
    if not kept_test:
        fabric.print(f"Note: {args.data_dir} has no test examples: no validation loss will be computed")
    return kept_train, kept_test, max_seq_length, prepared_prompt_format(args.data_dir)


def check_data_kind(data_dir: Path, pairs: bool) -> None:
    """Preference pairs for DPO, examples for the other methods: the other kind is refused with what to run."""
    if not (Path(data_dir) / "prepare_config.json").is_file():
        return  # loading says what is missing
    if (read_prepare_config(data_dir).get("kind") == "preference") != pairs:
        raise ValueError(f"{data_dir} holds preference pairs (prepare_data/preference.py): train on them with "
                         "finetune/dpo.py" if not pairs else f"{data_dir} holds instruction examples, not preference "
                         "pairs: prepare pairs of a chosen and a rejected answer with prepare_data/preference.py")
