"""Import a PEFT LoRA adapter (trained with transformers + peft on a Llama model) as a lit-lora LoRA file.

    python checkpoints/import_peft.py --peft_dir path/to/adapter --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --output_path out/lora/imported.pth

r, lora_alpha, lora_dropout and target_modules come from adapter_config.json; the file then works wherever a
LoRA file from finetune/lora.py does (--lora_path).
"""

from pathlib import Path

from lit_lora.cli import cli
from lit_lora.convert.peft import import_peft_adapter


def main(peft_dir: Path, checkpoint_dir: Path, output_path: Path) -> None:
    """Convert a PEFT LoRA adapter folder to a lit-lora LoRA file.

    Args:
        peft_dir: The adapter folder (adapter_config.json, adapter_model.safetensors or adapter_model.bin).
        checkpoint_dir: The lit-lora checkpoint folder of the base model the adapter was trained on.
        output_path: The LoRA file to write.
    """
    import_peft_adapter(peft_dir, checkpoint_dir, output_path)


if __name__ == "__main__":
    cli(main)
