"""Finetune every weight of a LLaMA (or pretrain a small one from scratch).

    python finetune/full.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca --devices 4

Every parameter trains, so every weight also has a gradient and two AdamW moments: in bf16-true that is
2 (weight) + 2 (gradient) + 4 (two bf16 moments) = 8 bytes per parameter, 54 GB for 7B before any
activation (16 bytes, 108 GB, with fp32 weights), which is why full finetuning needs FSDP over several GPUs
(sharded by Block). The result is a whole checkpoint folder in out_dir
(lit_model.pth, model_config.json, the tokenizer's files) that generate/full.py and every other script load.

With --from_scratch true, the model starts from random weights of the --model_name preset, and
checkpoint_dir only has to hold a tokenizer (tokenizer.model or tokenizer.json): the CPU demo pretrains its tiny
base model this way.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from lit_lora.checkpoint import load_model, save_checkpoint_dir
from lit_lora.cli import check_flag, cli
from lit_lora.devices import launch_fabric
from lit_lora.model import PRESETS, Config, LLaMA
from lit_lora.quantize import QUANTIZE_MODES
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import fit
from lit_lora.train_args import TrainArgs


@dataclass
class FullArgs(TrainArgs):
    """Finetune (or pretrain) all weights.

    Args:
        from_scratch: Start from random weights of the --model_name preset instead of checkpoint_dir's weights.
        model_name: The Config preset to build with --from_scratch (e.g. tiny); the vocabulary comes from the tokenizer.
    """

    out_dir: Path = Path("out/full/alpaca")
    learning_rate: float = 3e-5
    from_scratch: bool = False
    model_name: Optional[str] = None

    def __post_init__(self):
        check_flag(self, "quantize", self.quantize not in QUANTIZE_MODES,  # (an unknown mode: TrainArgs says so)
                   "full finetuning trains every weight, and a 4-bit weight cannot train; use finetune/lora.py "
                   f"--quantize {self.quantize} (QLoRA), or leave --quantize out")
        super().__post_init__()
        check_flag(self, "model_name", self.model_name is None or self.model_name in PRESETS,
                   f"is not a preset; choose one of {', '.join(PRESETS)}")
        check_flag(self, "model_name", not self.from_scratch or self.model_name is not None,
                   "--from_scratch true needs --model_name, a preset such as tiny (see lit_lora/model.py)")


def main(args: FullArgs) -> dict:
    fabric = launch_fabric(args, multi_device_strategy="fsdp")
    tokenizer = Tokenizer(args.checkpoint_dir)
    if args.from_scratch:
        with fabric.init_module():
            model = LLaMA(Config.from_name(args.model_name, vocab_size=tokenizer.vocab_size))
    else:
        model = load_model(args.checkpoint_dir)
    def save_weights(model: LLaMA, folder, trained: dict) -> None:  # a whole checkpoint, with the format it learned
        config = replace(model.config, extra={**model.config.extra, "prompt": model.prompt_format})
        save_checkpoint_dir(folder, trained, config, tokenizer.files)

    return fit(fabric, model, args, save_weights)


if __name__ == "__main__":
    cli(main, FullArgs)
