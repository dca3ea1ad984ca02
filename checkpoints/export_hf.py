"""Export a lit-lora checkpoint folder (optionally with a LoRA merged in) to the Hugging Face format.

    python checkpoints/export_hf.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/alpaca/lit_lora_finetuned.pth --output_dir out/hf/llama-2-7b-alpaca

writes config.json, model.safetensors, and the tokenizer as tokenizer.model and as tokenizer.json,
tokenizer_config.json, special_tokens_map.json; then in Python:
    transformers.LlamaForCausalLM.from_pretrained("out/hf/llama-2-7b-alpaca")
    transformers.AutoTokenizer.from_pretrained("out/hf/llama-2-7b-alpaca")  # the ids lit-lora's Tokenizer gives
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.common import DtypeName
from lit_lora.convert.hf import export_hf_checkpoint


def main(checkpoint_dir: Path, output_dir: Path, lora_path: Optional[Path] = None,
         dtype: Optional[DtypeName] = None) -> None:
    """Export lit-lora weights as a Hugging Face LlamaForCausalLM folder.

    Args:
        checkpoint_dir: The lit-lora checkpoint folder (lit_model.pth, model_config.json, tokenizer.model).
        output_dir: Where to write the Hugging Face folder.
        lora_path: A LoRA file from finetune/lora.py to merge into the weights first (W0 + alpha/r B A).
        dtype: float32, float16 or bfloat16 (others are refused); by default the checkpoint's own dtype.
    """
    export_hf_checkpoint(checkpoint_dir, output_dir, lora_path, dtype)


if __name__ == "__main__":
    cli(main)
