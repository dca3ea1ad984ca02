"""Answer an instruction with a fully finetuned model (the checkpoint folder finetune/full.py writes).

    python generate/full.py --checkpoint_dir out/full/alpaca --prompt "What do llamas eat?"
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.chat import GenerateArgs, load_for_generation, run_generation
from lit_lora.cli import cli
from lit_lora.tokenizer import check_utf8


@dataclass
class FullGenerateArgs(GenerateArgs):
    """Generate with a fully finetuned model.

    Args:
        input: Optional input (context) for the instruction, as in the Alpaca template.
    """

    prompt: str = "What food do llamas eat?"
    checkpoint_dir: Path = Path("out/full/alpaca")
    input: str = ""

    def __post_init__(self):
        super().__post_init__()
        check_utf8(self.input, "--input")


def main(args: FullGenerateArgs) -> list[str]:
    model = load_for_generation(args)  # memory-mapped, or with --quantize its Blocks in 4 bits
    return run_generation(model, args, input=args.input, default_style="alpaca")  # the recorded format (else alpaca), with --input


if __name__ == "__main__":
    cli(main, FullGenerateArgs)
