"""Answer an instruction with a LLaMA-Adapter-finetuned model: the base checkpoint plus an adapter file.

    python generate/adapter.py --adapter_path out/adapter/alpaca/lit_adapter_finetuned.pth --prompt "What do llamas eat?"

The prompt length and start layer are read from the adapter file. The adapter prompts' keys and values are
computed once per generation and kept with the KV cache, not recomputed for every token.
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.chat import GenerateArgs, load_for_generation, run_generation
from lit_lora.cli import cli
from lit_lora.method_files import load_adapter
from lit_lora.tokenizer import check_utf8


@dataclass
class AdapterGenerateArgs(GenerateArgs):
    """Generate with a LLaMA-Adapter-finetuned model.

    Args:
        adapter_path: The adapter file written by finetune/adapter.py.
        input: Optional input (context) for the instruction, as in the Alpaca template.
    """

    prompt: str = "What food do llamas eat?"
    adapter_path: Path = Path("out/adapter/alpaca/lit_adapter_finetuned.pth")
    input: str = ""

    def __post_init__(self):
        super().__post_init__()
        check_utf8(self.input, "--input")


def main(args: AdapterGenerateArgs) -> list[str]:
    model = load_for_generation(args)  # memory-mapped, or with --quantize its Blocks in 4 bits
    load_adapter(model, args.adapter_path)  # checks the file fits this base model, names any mismatch
    return run_generation(model, args, input=args.input, default_style="alpaca")  # the recorded format (else alpaca), with --input


if __name__ == "__main__":
    cli(main, AdapterGenerateArgs)
