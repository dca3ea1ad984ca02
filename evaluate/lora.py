"""Evaluate a LoRA-finetuned model: the base checkpoint plus a LoRA file, with the flags of evaluate/base.py.

    python evaluate/lora.py --lora_path out/lora/alpaca/lit_lora_finetuned.pth --tasks arc_easy --limit 100

LoRA stays unmerged by default: each layer computes W0 x + alpha/r B A x, the model as it was trained, and the base
weights are never changed; --merge true evaluates W = W0 + alpha/r B A instead, as generate/lora.py decodes.
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.checkpoint import load_model
from lit_lora.cli import cli
from lit_lora.evaluate_data import EvaluateArgs, run_evaluation
from lit_lora.method_files import load_lora
from lit_lora.quantize import load_model_4bit


@dataclass
class LoRAEvaluateArgs(EvaluateArgs):
    """Evaluate a LoRA-finetuned model.

    Args:
        lora_path: The LoRA file written by finetune/lora.py.
        merge: Merge LoRA into the weights first (not possible on a --quantize base: it stays unmerged there).
    """

    lora_path: Path = Path("out/lora/alpaca/lit_lora_finetuned.pth")
    merge: bool = False


def main(args: LoRAEvaluateArgs) -> dict:
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # the Blocks' weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize)
    load_lora(model, args.lora_path)  # checks the file fits this base model, names any mismatch
    return run_evaluation(model, args, merge=args.merge and args.quantize is None)


if __name__ == "__main__":
    cli(main, LoRAEvaluateArgs)
