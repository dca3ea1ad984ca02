"""Evaluate a fully finetuned model (the checkpoint folder finetune/full.py writes), with the flags of
evaluate/base.py.

    python evaluate/full.py --checkpoint_dir out/full/alpaca --data_dir data/alpaca
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.checkpoint import load_model
from lit_lora.cli import cli
from lit_lora.evaluate_data import EvaluateArgs, run_evaluation
from lit_lora.quantize import load_model_4bit


@dataclass
class FullEvaluateArgs(EvaluateArgs):
    """Evaluate a fully finetuned model."""

    checkpoint_dir: Path = Path("out/full/alpaca")


def main(args: FullEvaluateArgs) -> dict:
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # the Blocks' weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize)
    return run_evaluation(model, args)


if __name__ == "__main__":
    cli(main, FullEvaluateArgs)
