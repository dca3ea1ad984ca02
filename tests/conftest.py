"""Fixtures shared by the tests: a tokenizer trained here, Hugging Face tokenizer.json folders built here, and tiny
checkpoint folders. No network, no downloads."""

import json
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
    """A checkpoint folder (lit_model.pth, model_config.json, the tokenizer's files) with random weights.
    `tokenizer_path`: a tokenizer.model, or a folder with one or with a tokenizer.json."""
    tokenizer = Tokenizer(tokenizer_path)
    config = Config.from_name(name, vocab_size=tokenizer.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = LLaMA(config)
    return save_checkpoint_dir(folder, model.state_dict(), config, tokenizer.files)


@pytest.fixture
def checkpoint_dir(tmp_path, tokenizer_path) -> Path:
    return make_checkpoint(tmp_path / "checkpoint", tokenizer_path)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json folders (Llama 3, SmolLM2), built here with the `tokenizers` library

# Llama 3's pre-tokenizer splits text with this regex (tiktoken's cl100k pattern) before its byte-level BPE:
# contractions, words with one leading non-letter, numbers of 1 to 3 digits, punctuation runs, whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer_json_dir(folder: Path, family: str, instruct: bool = True) -> Path:
    """A folder with tokenizer.json, tokenizer_config.json and generation_config.json laid out as the Hugging Face
    repos of `family` lay them out, with a small byte-level BPE trained on make_corpus().

    llama3: the special tokens after the BPE vocabulary (as 128000.. in Llama 3); the post-processor puts
    <|begin_of_text|> before every text; EOS <|eot_id|> (instruct) or <|end_of_text|> (base), and generation
    ends at [<|end_of_text|>, <|eot_id|>] (instruct) or <|end_of_text|> (base).
    smollm2: the special tokens first (ids 0, 1, 2, as in SmolLM2); no BOS before a text; BOS/EOS
    <|im_start|>/<|im_end|> (instruct) or <|endoftext|> (base)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family != "llama3")
    if family == "llama3":
        split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SMOLLM2_SPECIAL if family == "smollm2" else [], show_progress=False)
    tokenizer.train_from_iterator(make_corpus(), trainer)
    if family == "llama3":
        tokenizer.add_special_tokens(LLAMA3_SPECIAL)
        bos, eos = "<|begin_of_text|>", "<|eot_id|>" if instruct else "<|end_of_text|>"
        bos_first = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                  special_tokens=[(bos, tokenizer.token_to_id(bos))])
        tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos_first])
        tokenizer_class, ends = "PreTrainedTokenizerFast", ["<|end_of_text|>", "<|eot_id|>"] if instruct else [eos]
    elif family == "smollm2":
        bos, eos = ("<|im_start|>", "<|im_end|>") if instruct else ("<|endoftext|>", "<|endoftext|>")
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer_class, ends = "GPT2Tokenizer", [eos]
    else:
        raise ValueError(f"family {family!r}: llama3 or smollm2")
    tokenizer.save(str(folder / "tokenizer.json"))
    # a token is a string or, in older files, a dict as transformers saves an AddedToken
    config = {"bos_token": bos, "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
                                              "rstrip": False, "single_word": False},
              "tokenizer_class": tokenizer_class, "model_max_length": 8192}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    end_ids = [tokenizer.token_to_id(token) for token in ends]
    generation = {"bos_token_id": tokenizer.token_to_id(bos), "eos_token_id": end_ids if len(end_ids) > 1 else end_ids[0]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-3-Instruct-style tokenizer.json folder (make_tokenizer_json_dir)."""
    return make_tokenizer_json_dir(tmp_path_factory.mktemp("llama3-tokenizer"), "llama3")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A SmolLM2-Instruct-style tokenizer.json folder (make_tokenizer_json_dir)."""
    return make_tokenizer_json_dir(tmp_path_factory.mktemp("smollm2-tokenizer"), "smollm2")
