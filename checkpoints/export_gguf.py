"""Export a lit-lora checkpoint folder (optionally with a LoRA merged in) to one GGUF file for llama.cpp and ollama.

    python checkpoints/export_gguf.py --checkpoint_dir checkpoints/smollm2-gguf \
        --lora_path out/lora/capitals/lit_lora_finetuned.pth --outtype q8_0 --output_path out/smollm2-capitals.gguf

writes the llama architecture's metadata, the weights (matrices as f32, f16, bf16 or q8_0; norms as f32), the
tokenizer with its special ids, and the chat template; then:
    llama-cli -m out/smollm2-capitals.gguf -cnv          # llama.cpp
    ollama create smollm2-capitals -f Modelfile           # with FROM ./out/smollm2-capitals.gguf
Needs the gguf extra: pip install -e ".[gguf]". See howto/gguf.md.
"""

from pathlib import Path
from typing import Literal, Optional

from lit_lora.cli import cli
from lit_lora.convert.gguf import export_gguf_checkpoint


def main(checkpoint_dir: Path, output_path: Path, lora_path: Optional[Path] = None,
         outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16") -> None:
    """Export lit-lora weights as a GGUF file.

    Args:
        checkpoint_dir: The lit-lora checkpoint folder (lit_model.pth, model_config.json, the tokenizer).
        output_path: The .gguf file to write.
        lora_path: A LoRA file from finetune/lora.py to merge into the weights first (W0 + alpha/r B A).
        outtype: The type of the weight matrices: f32 (exact), f16, bf16, or q8_0 (8 bits and a scale per 32).
    """
    export_gguf_checkpoint(checkpoint_dir, output_path, lora_path, outtype)


if __name__ == "__main__":
    cli(main)
