"""Continue a prompt with a pretrained (or fully finetuned) checkpoint: no prompt template.

    python generate/base.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "The capital of France is"

An instruct model (Llama 3.x Instruct, SmolLM2-Instruct) answers best in its own chat format: --prompt_style
chat_template puts the prompt, as the user's message, in the checkpoint's own chat template (or llama3, chatml: the
hand-written ones); --interactive true then keeps a conversation.
"""

from lit_lora.chat import GenerateArgs, load_for_generation, run_generation
from lit_lora.cli import cli


def main(args: GenerateArgs) -> list[str]:
    model = load_for_generation(args)  # memory-mapped, or with --quantize its Blocks in 4 bits
    return run_generation(model, args)  # without a prompt style, the prompt is continued as it is


if __name__ == "__main__":
    cli(main, GenerateArgs)
