"""Finetune a LLaMA with LoRA: only the low-rank matrices A and B of the targeted linears train.

    python finetune/lora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca

Defaults are the Alpaca-LoRA reference setup (lr 3e-4, batch 128, r 8, alpha 16, dropout 0.05, q and v, 3 epochs).
The result is out_dir/lit_lora_finetuned.pth: the LoRA tensors and their hyperparameters, a few MB.
With --quantize bnb.nf4 (or bnb.nf4-dq) this is QLoRA: the frozen base is stored in 4 bits (lit_lora/quantize.py).
"""

from dataclasses import dataclass

from lit_lora.checkpoint import load_model
from lit_lora.cli import cli, config_flags
from lit_lora.devices import launch_fabric
from lit_lora.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_lora.method_files import save_lora
from lit_lora.quantize import load_model_4bit
from lit_lora.train import fit
from lit_lora.train_args import TrainArgs

LORA_FLAGS = dict(r="lora_r", alpha="lora_alpha", dropout="lora_dropout", targets="lora_targets")  # config -> flag


@dataclass
class LoRAArgs(TrainArgs):
    """Finetune with LoRA (Hu et al., 2021). Every flag and its default is listed below.

    Args:
        lora_r: Rank r of the update B A.
        lora_alpha: The update is scaled by alpha / r.
        lora_dropout: Dropout on the input of the LoRA path.
        lora_targets: Which linears get LoRA: any of q, k, v, o, gate, up, down, head; e.g. --lora_targets [q,k,v,o].
    """

    # The shared defaults of TrainArgs are Alpaca-LoRA's (lr 3e-4, batch 128, 3 epochs, out/lora/alpaca).
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        super().__post_init__()
        with config_flags(**LORA_FLAGS):
            LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)  # refuses bad values


def main(args: LoRAArgs) -> dict:
    fabric = launch_fabric(args)
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # QLoRA: the Blocks' frozen weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize, fabric.device)
    with config_flags(**LORA_FLAGS):  # r is checked against the model's layers
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
    mark_only_lora_as_trainable(model)  # W0 stays frozen: no gradients, no optimizer state for it
    return fit(fabric, model, args, save_weights=lambda m, folder, trained: save_lora(m, folder / "lit_lora_finetuned.pth", trained))


if __name__ == "__main__":
    cli(main, LoRAArgs)
