"""Evaluate a pretrained (or fully finetuned) checkpoint: lm-eval-harness tasks, a prepared test split, a text.

    python evaluate/base.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --tasks arc_easy --limit 100
    python evaluate/base.py --checkpoint_dir ... --include_path my_tasks --tasks capitals --output_path out/base.json
    python evaluate/base.py --checkpoint_dir ... --data_dir data/alpaca --generate true
    python evaluate/base.py --checkpoint_dir ... --text_file wiki.txt

The harness's tasks need pip install -e ".[eval]"; the test split and the text need nothing more.
"""

from lit_lora.checkpoint import load_model
from lit_lora.cli import cli
from lit_lora.evaluate_data import EvaluateArgs, run_evaluation
from lit_lora.quantize import load_model_4bit


def main(args: EvaluateArgs) -> dict:
    if args.quantize is None:  # meta device + memory-mapped weights: no second copy in RAM
        model = load_model(args.checkpoint_dir)
    else:  # the Blocks' weights stored in 4 bits, each quantized as it is read
        model = load_model_4bit(args.checkpoint_dir, args.quantize)
    return run_evaluation(model, args)


if __name__ == "__main__":
    cli(main, EvaluateArgs)
