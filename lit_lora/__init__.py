"""lit-lora: a readable LLaMA with LoRA, LLaMA-Adapter and full finetuning.

Read model.py, then lora.py, then train.py (the training loop), then generation.py (sampling): the course, about
1,250 lines. The rest is periphery a learner may skip; README.md ("Read the code") says what each file holds.
"""
