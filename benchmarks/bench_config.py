"""The fixed CPU model of the benchmark scripts: LLaMA's shape at 8 layers of width 512 (8 heads, the 32,000-token
vocabulary), 60M parameters. Not a published model, so not among lit_lora/model.py's presets."""

from lit_lora.model import Config


def bench_config() -> Config:
    return Config(name="bench-8x512", block_size=256, n_layer=8, n_head=8, n_embd=512)
