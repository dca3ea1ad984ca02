"""Weights in and out of other formats: Hugging Face (hf.py, with the tokenizer files of an export in
hf_tokenizer.py), Meta's original release (meta.py), PEFT adapters (peft.py); common.py holds what they share.

Periphery: a learner may skip this package. Nothing of the course (model, LoRA, the training loop, sampling)
imports it; only the checkpoints/ scripts and the exports do.
"""
