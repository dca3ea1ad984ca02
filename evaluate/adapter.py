"""Evaluate a LLaMA-Adapter-finetuned model: the base checkpoint plus an adapter file, with the flags of
evaluate/base.py.

    python evaluate/adapter.py --adapter_path out/adapter/alpaca/lit_adapter_finetuned.pth --data_dir data/alpaca
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.checkpoint import load_model
from lit_lora.cli import cli
from lit_lora.evaluate_data import EvaluateArgs, run_evaluation
from lit_lora.method_files import load_adapter
from lit_lora.quantize import load_model_4bit


@dataclass
class AdapterEvaluateArgs(EvaluateArgs):
    """Evaluate a LLaMA-Adapter-finetuned model.

    Args:
        adapter_path: The adapter file written by finetune/adapter.py.
    """

    adapter_path: Path = Path("out/adapter/alpaca/lit_adapter_finetuned.pth")


def main(args: AdapterEvaluateArgs) -> dict:
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # the Blocks' weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize)
    load_adapter(model, args.adapter_path)  # checks the file fits this base model, names any mismatch
    return run_evaluation(model, args)


if __name__ == "__main__":
    cli(main, AdapterEvaluateArgs)
