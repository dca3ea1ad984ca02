"""Continue a prompt with a pretrained (or fully finetuned) checkpoint: no prompt template.

    python generate/base.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "The capital of France is"
"""

from lit_lora.generation import GenerateArgs, run_generation
from lit_lora.utils import cli, load_model


def main(args: GenerateArgs) -> list[str]:
    model = load_model(args.checkpoint_dir)
    return run_generation(model, args, show_prompt=True)


if __name__ == "__main__":
    cli(main, GenerateArgs)
