"""Answer an instruction with a LoRA-finetuned model: the base checkpoint plus a LoRA file.

    python generate/lora.py --lora_path out/lora/alpaca/lit_lora_finetuned.pth --prompt "What do llamas eat?"

r, alpha and the targets are read from the LoRA file. LoRA is merged into the weights once before decoding
(W = W0 + alpha/r B A), so the finetuned model decodes exactly as fast as the base model. With --quantize (a 4-bit
base, as QLoRA trains on) LoRA stays unmerged: W0 + B A rounded to 4 bits again would lose most of B A, so every
token pays the two thin LoRA matmuls (and the dequantization of W0). Any LoRA file loads with or without --quantize.
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.chat import GenerateArgs, load_for_generation, run_generation
from lit_lora.cli import cli
from lit_lora.method_files import load_lora
from lit_lora.tokenizer import check_utf8


@dataclass
class LoRAGenerateArgs(GenerateArgs):
    """Generate with a LoRA-finetuned model.

    Args:
        lora_path: The LoRA file written by finetune/lora.py.
        input: Optional input (context) for the instruction, as in the Alpaca template.
    """

    prompt: str = "What food do llamas eat?"
    lora_path: Path = Path("out/lora/alpaca/lit_lora_finetuned.pth")
    input: str = ""

    def __post_init__(self):
        super().__post_init__()
        check_utf8(self.input, "--input")


def main(args: LoRAGenerateArgs) -> list[str]:
    model = load_for_generation(args)  # memory-mapped, or with --quantize its Blocks in 4 bits
    load_lora(model, args.lora_path)  # checks the file fits this base model, names any mismatch
    # merged once cast to the run's dtype; a 4-bit W0 cannot take B A exactly: on a quantized base LoRA stays unmerged
    return run_generation(model, args, input=args.input, default_style="alpaca",  # the recorded format, else alpaca
                          merge=args.quantize is None)


if __name__ == "__main__":
    cli(main, LoRAGenerateArgs)
