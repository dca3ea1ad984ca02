"""Preference-tune a LLaMA with DPO and LoRA: the chosen answer of each pair made likelier than the rejected one.

    python finetune/dpo.py --checkpoint_dir checkpoints/smollm2 --data_dir data/pairs

The data are pairs prepared by prepare_data/preference.py. The loss and why the reference model costs no memory:
lit_lora/dpo.py. With --init_lora_path the supervised LoRA is merged first (the reference is the supervised model)
and the file saved holds both updates. The result is out_dir/lit_lora_finetuned.pth, an ordinary LoRA file: run it
with generate/lora.py --lora_path, export it as any other (howto/dpo.md).
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # finetune/lora.py is imported as a module

from finetune.lora import LORA_FLAGS, LoRAArgs  # noqa: E402  the same LoRA flags
from lit_lora.checkpoint import load_model  # noqa: E402
from lit_lora.cli import check_flag, cli, config_flags  # noqa: E402
from lit_lora.devices import launch_fabric  # noqa: E402
from lit_lora.dpo import dpo_objective, merge_init_lora, save_dpo_lora  # noqa: E402
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable  # noqa: E402
from lit_lora.quantize import load_model_4bit  # noqa: E402
from lit_lora.train import fit  # noqa: E402


@dataclass
class DPOArgs(LoRAArgs):
    """Preference-tune with DPO (Rafailov et al., 2023) and LoRA. Every flag and its default is listed below.

    Args:
        beta: The weight of staying near the reference (the KL term): smaller lets the model drift further.
        label_smoothing: The probability that a pair's label is wrong (conservative DPO); 0: plain DPO.
        init_lora_path: A supervised LoRA file (finetune/lora.py) to start from: merged into the base, so it is the
            reference, and held in the file saved; null: the base model is the reference.
    """

    # micro_batch_size and global_batch_size count pairs: a micro batch of 2 pairs computes 4 sequences
    data_dir: Path = Path("data/pairs")
    out_dir: Path = Path("out/dpo/pairs")
    learning_rate: float = 5e-4
    global_batch_size: int = 32
    micro_batch_size: int = 2
    epochs: float = 1
    warmup_epochs: Optional[float] = 0.1
    eval_interval: int = 50
    lora_dropout: float = 0.0
    beta: float = 0.1
    label_smoothing: float = 0.0
    init_lora_path: Optional[Path] = None

    def __post_init__(self):
        super().__post_init__()
        check_flag(self, "beta", self.beta > 0, "must be positive (0 would make every reward 0)")
        check_flag(self, "label_smoothing", 0 <= self.label_smoothing < 0.5,
                   "must be at least 0 and below 0.5 (at 0.5 the labels carry no preference)")
        check_flag(self, "init_lora_path", self.init_lora_path is None or self.quantize is None,
                   "cannot go with --quantize: the supervised LoRA is merged into the base, which 4 bits cannot hold. "
                   "Leave --quantize out")
        check_flag(self, "init_lora_path", self.init_lora_path is None or Path(self.init_lora_path).is_file(),
                   "is not a file: give the lit_lora_finetuned.pth that finetune/lora.py wrote")


def main(args: DPOArgs) -> dict:
    fabric = launch_fabric(args)
    if args.quantize is None:
        model = load_model(args.checkpoint_dir)
    else:  # the frozen base stored in 4 bits, as with QLoRA (finetune/lora.py)
        model = load_model_4bit(args.checkpoint_dir, args.quantize, fabric.device)
    init = None
    if args.init_lora_path is not None:  # the supervised model becomes the base, and so the reference
        init = (args.init_lora_path, merge_init_lora(model, args.init_lora_path))
    with config_flags(**LORA_FLAGS):
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)
    mark_only_lora_as_trainable(model)
    return fit(fabric, model, args, objective=dpo_objective(args.beta, args.label_smoothing),
               save_weights=lambda m, folder, trained: save_dpo_lora(m, folder / "lit_lora_finetuned.pth", trained,
                                                                     args.beta, args.label_smoothing, init))


if __name__ == "__main__":
    cli(main, DPOArgs)
