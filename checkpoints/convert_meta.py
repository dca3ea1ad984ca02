"""Convert Meta's original LLaMA or Llama 2 weights (consolidated.NN.pth + params.json) into a lit-lora checkpoint.

    python checkpoints/convert_meta.py --meta_dir /path/to/llama/7B --model_size 7B --output_dir checkpoints/lit/7B
    python checkpoints/convert_meta.py --meta_dir /path/to/llama-2-13b --model_size Llama-2-13b \
        --output_dir checkpoints/lit/Llama-2-13b

Model-parallel shards (13B and up) are merged, and the query/key rows are reordered from Meta's interleaved
RoPE layout to the rotate-half layout of lit_lora/model.py. tokenizer.model is taken from --meta_dir or its parent.
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.common import DtypeName
from lit_lora.convert.meta import convert_meta_checkpoint


def main(meta_dir: Path, model_size: str, output_dir: Path, dtype: Optional[DtypeName] = None) -> None:
    """Convert Meta's LLaMA weights to lit-lora.

    Args:
        meta_dir: The folder of one model from Meta's download (consolidated.*.pth and params.json).
        model_size: The preset in lit_lora/model.py it is: 7B, 13B, 30B, 65B (LLaMA) or Llama-2-7b,
            Llama-2-13b, Llama-2-70b. It gives the name and context length and is checked against params.json.
        output_dir: Where to write the lit-lora checkpoint folder.
        dtype: float32, float16 or bfloat16 (others are refused); by default the checkpoint's own dtype.
    """
    convert_meta_checkpoint(meta_dir, output_dir, model_size, dtype)


if __name__ == "__main__":
    cli(main)
