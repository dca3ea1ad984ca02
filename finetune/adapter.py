"""Finetune a LLaMA with LLaMA-Adapter: learnable prompts in the top layers, gated in from zero.

    python finetune/adapter.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca

Defaults are the LLaMA-Adapter paper's setup (lr 9e-3, weight decay 0.02, batch 64 per device, 5 epochs,
warmup of 2 epochs counted in optimizer steps). The result is out_dir/lit_adapter_finetuned.pth.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_lora.adapter import (
    AdapterConfig,
    apply_adapter,
    mark_only_adapter_as_trainable,
)
from lit_lora.checkpoint import load_model
from lit_lora.cli import cli, config_flags
from lit_lora.devices import launch_fabric
from lit_lora.method_files import save_adapter
from lit_lora.quantize import load_model_4bit
from lit_lora.train import fit
from lit_lora.train_args import TrainArgs

ADAPTER_FLAGS = dict(prompt_length="adapter_prompt_length", start_layer="adapter_start_layer")  # config -> flag


@dataclass
class AdapterArgs(TrainArgs):
    """Finetune with LLaMA-Adapter (Zhang et al., 2023). Every flag and its default is listed below.

    Args:
        adapter_prompt_length: Learnable prompt tokens per adapted layer.
        adapter_start_layer: The first layer (counting from 0) that gets a prompt.
    """

    out_dir: Path = Path("out/adapter/alpaca")
    learning_rate: float = 9e-3
    weight_decay: float = 0.02
    global_batch_size: int = 64  # per device in the paper: multiply by --devices to keep it so
    epochs: float = 5
    warmup_epochs: Optional[float] = 2
    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2

    def __post_init__(self):
        super().__post_init__()
        with config_flags(**ADAPTER_FLAGS):
            AdapterConfig(self.adapter_prompt_length, self.adapter_start_layer)  # refuses bad values


def main(args: AdapterArgs) -> dict:
    fabric = launch_fabric(args)
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # the Blocks' frozen weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize, fabric.device)
    with config_flags(**ADAPTER_FLAGS):  # start_layer is checked against the model's layers
        apply_adapter(model, prompt_length=args.adapter_prompt_length, start_layer=args.adapter_start_layer)
    mark_only_adapter_as_trainable(model)
    return fit(fabric, model, args,
               save_weights=lambda m, folder, trained: save_adapter(m, folder / "lit_adapter_finetuned.pth", trained))


if __name__ == "__main__":
    cli(main, AdapterArgs)
