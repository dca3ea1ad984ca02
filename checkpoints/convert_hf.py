"""Convert a Hugging Face LLaMA model folder (Llama 2 -hf, TinyLlama, OpenLLaMA) into a lit-lora checkpoint folder.

    python checkpoints/convert_hf.py --hf_dir checkpoints/meta-llama/Llama-2-7b-hf

reads config.json, the weights (model.safetensors or pytorch_model.bin, one file or shards with their index) and
tokenizer.model, and writes lit_model.pth, model_config.json and tokenizer.model (by default beside them, so
the same folder is then a lit-lora --checkpoint_dir). Memory: one copy of the weights (see lit_lora/convert/hf.py).
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.common import DtypeName
from lit_lora.convert.hf import convert_hf_checkpoint


def main(hf_dir: Path, output_dir: Optional[Path] = None, model_name: Optional[str] = None,
         dtype: Optional[DtypeName] = None) -> None:
    """Convert Hugging Face LlamaForCausalLM weights to lit-lora.

    Args:
        hf_dir: The Hugging Face model folder (config.json, weights, tokenizer.model).
        output_dir: Where to write the lit-lora checkpoint folder; by default hf_dir itself.
        model_name: A preset of lit_lora/model.py (e.g. Llama-2-7b) to name the model and take its context
            length from; it must agree with config.json. By default everything comes from config.json.
        dtype: float32, float16 or bfloat16 (others are refused); by default the checkpoint's own dtype.
    """
    convert_hf_checkpoint(hf_dir, output_dir, model_name, dtype)


if __name__ == "__main__":
    cli(main)
