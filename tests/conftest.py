"""Fixtures shared by the tests: a tokenizer trained here and tiny checkpoint folders. No network, no downloads."""

import random
from pathlib import Path

import pytest
import torch

from lit_lora.model import Config, LLaMA
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import save_checkpoint_dir


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Instruction-like English sentences with digits, enough for a few hundred BPE merges."""
    rng = random.Random(seed)
    subjects = ["The model", "A student", "The teacher", "Our team", "The quick brown fox", "Each layer"]
    verbs = ["reads", "writes", "learns", "adds", "jumps over", "multiplies", "explains"]
    objects = ["the instruction", "a response", "the lazy dog", "two numbers", "the input", "a low-rank matrix"]
    lines = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction:", "### Input:", "### Response:",
    ]
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}: {a} + {b} = {a + b}.")
    return lines


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train(make_corpus(), vocab_size=320, model_prefix=folder / "tokenizer")
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def make_checkpoint(folder: Path, tokenizer_path: Path, name: str = "micro", seed: int = 0, **overrides) -> Path:
    """A checkpoint folder (lit_model.pth, model_config.json, tokenizer.model) with random weights."""
    vocab_size = Tokenizer(tokenizer_path).vocab_size
    config = Config.from_name(name, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = LLaMA(config)
    return save_checkpoint_dir(folder, model.state_dict(), config, tokenizer_path)


@pytest.fixture
def checkpoint_dir(tmp_path, tokenizer_path) -> Path:
    return make_checkpoint(tmp_path / "checkpoint", tokenizer_path)
