"""Continue a prompt with a pretrained (or fully finetuned) checkpoint: no prompt template.

    python generate/base.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "The capital of France is"
"""

from pathlib import Path
from typing import Literal, Optional

from jsonargparse import CLI

from lit_lora.generation import generate_and_print, interactive_loop, prepare_for_generation
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import load_model


def main(
    prompt: str = "Hello, my name is",
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: Optional[int] = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    interactive: bool = False,
) -> None:
    """Generate text from a base model.

    Args:
        prompt: The text to continue.
        checkpoint_dir: Folder with lit_model.pth, model_config.json and tokenizer.model.
        max_new_tokens: Generate at most this many tokens (fewer if EOS comes first).
        temperature: 0 is greedy decoding; higher values sample more freely.
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only from the smallest set of tokens whose probability reaches p (1.0: off).
        num_samples: How many continuations to generate.
        seed: Random seed for sampling (None: not reproducible).
        precision: Weights' precision; default bf16-true on a GPU that supports it, else 32-true.
        compile: torch.compile the model (faster long generations on a GPU after a slow first call).
        interactive: Read prompts from the terminal in a loop instead of using --prompt.
    """
    model = prepare_for_generation(load_model(checkpoint_dir), precision, compile)
    tokenizer = Tokenizer(checkpoint_dir)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   num_samples=num_samples, seed=seed)
    if interactive:
        interactive_loop(model, tokenizer, make_prompt=lambda text: text, **options)
    else:
        generate_and_print(model, tokenizer, prompt, show_prompt=True, **options)


if __name__ == "__main__":
    CLI(main)
