"""lit-lora: a readable LLaMA with LoRA, LLaMA-Adapter and full finetuning."""
