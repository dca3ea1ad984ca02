"""Export a lit-lora LoRA file as a PEFT adapter, to use it with Hugging Face transformers + peft.

    python checkpoints/export_peft.py --lora_path out/lora/lit_lora_finetuned.pth --output_dir out/peft/alpaca \
        --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

writes adapter_config.json and adapter_model.safetensors; then in Python, on the base model in Hugging Face format
(the downloaded repo, or checkpoints/export_hf.py's output):
    base = transformers.LlamaForCausalLM.from_pretrained("checkpoints/meta-llama/Llama-2-7b-hf")
    model = peft.PeftModel.from_pretrained(base, "out/peft/alpaca")
or, with the base that adapter_config.json names (see --base_model_name_or_path):
    model = peft.AutoPeftModelForCausalLM.from_pretrained("out/peft/alpaca")
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.peft import export_peft_adapter


def main(lora_path: Path, output_dir: Path, checkpoint_dir: Optional[Path] = None,
         base_model_name_or_path: Optional[str] = None) -> None:
    """Write a lit-lora LoRA file as a PEFT LoRA adapter folder.

    Args:
        lora_path: The LoRA file from finetune/lora.py.
        output_dir: Where to write the adapter folder.
        checkpoint_dir: The lit-lora base model folder, to check that the LoRA was trained on it.
        base_model_name_or_path: What adapter_config.json names as the base model (a Hugging Face repo id or
            folder), where AutoPeftModelForCausalLM loads it from. By default the folder the base was converted
            from by convert_hf.py (its model_config.json records it), else checkpoint_dir if it holds config.json;
            else null, with a warning.
    """
    export_peft_adapter(lora_path, output_dir, checkpoint_dir, base_model_name_or_path)


if __name__ == "__main__":
    cli(main)
