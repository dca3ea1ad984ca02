"""Convert a GGUF file (llama.cpp, ollama, LM Studio) of the llama architecture into a lit-lora checkpoint folder.

    python checkpoints/convert_gguf.py --gguf_path SmolLM2-135M-Instruct.Q4_1.gguf --output_dir checkpoints/smollm2-gguf

reads the file's metadata and tensors (F32, F16, BF16 and the quantized types the gguf package dequantizes: Q8_0,
Q4_0, Q4_1, the K-quants ...) and writes lit_model.pth, model_config.json, the tokenizer (tokenizer.json or
tokenizer.model) and the chat template: the same folder convert_hf.py writes, for finetune/ and generate/ to use.
A quantized file comes out dequantized (its quantization error stays in the weights). Needs the gguf extra:
pip install -e ".[gguf]". See howto/gguf.md.
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.common import DtypeName
from lit_lora.convert.gguf import convert_gguf_checkpoint


def main(gguf_path: Path, output_dir: Path, dtype: Optional[DtypeName] = None) -> None:
    """Convert a llama GGUF file to a lit-lora checkpoint folder.

    Args:
        gguf_path: The .gguf file.
        output_dir: Where to write the lit-lora checkpoint folder.
        dtype: float32, float16 or bfloat16 for the weights; by default float32 (what dequantizing gives).
    """
    convert_gguf_checkpoint(gguf_path, output_dir, dtype)


if __name__ == "__main__":
    cli(main)
