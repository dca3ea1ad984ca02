"""Fixtures shared by the tests: a tokenizer trained here, Hugging Face tokenizer.json folders built here, and tiny
checkpoint folders. No network, no downloads."""

import contextlib
import csv
import io
import json
import random
import runpy
import signal
import sys
from pathlib import Path

import lightning.fabric  # noqa: F401 (imported here, not first inside run_command below: its logger writes to the
# sys.stderr of its first import, which there would be a StringIO closed after the run)
import pytest
import torch

from lit_lora.checkpoint import save_checkpoint_dir
from lit_lora.data import prepare
from lit_lora.method_files import read_lora_file
from lit_lora.model import Config, LLaMA
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import loss_sum


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


@pytest.fixture(scope="session", autouse=True)
def decoding_cache(tmp_path_factory) -> Path:
    """Compiled decoding steps (lit_lora/inference.py) go to a folder of this test session, never to the user's
    ~/.cache; scripts run in a subprocess inherit it."""
    folder = tmp_path_factory.mktemp("lit_lora_cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LIT_LORA_CACHE", str(folder))
        yield folder


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


# ---------------------------------------------------------------------------------------------------------
# Training runs: a micro base model, a small prepared dataset, the flags of a short LoRA run, and what they log

WORDS = ["cat", "dog", "sun", "tree", "lamp", "river", "stone", "cloud", "bird", "fish", "moon", "rain"]


def make_setup(folder: Path, tokenizer_path: Path, tokenizer: Tokenizer) -> tuple[Path, Path, Path]:
    """A micro base model with a 256-token context and a small prepared instruction dataset, in `folder`."""
    checkpoint_dir = make_checkpoint(folder / "base", tokenizer_path, block_size=256)
    records = [{"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"} for w in WORDS]
    records += [{"instruction": "Say the word.", "input": "", "output": w} for w in WORDS]
    prepare(records, tokenizer, folder / "data", max_seq_length=256, test_split_size=4, seed=0)
    return checkpoint_dir, folder / "data", folder


@pytest.fixture
def setup(tmp_path, tokenizer_path, tokenizer):
    """make_setup in the test's tmp_path."""
    return make_setup(tmp_path, tokenizer_path, tokenizer)


def lora_args(checkpoint_dir, data_dir, out_dir, **overrides):
    from finetune.lora import LoRAArgs

    values = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, precision="32-true",
                  learning_rate=2e-2, global_batch_size=8, micro_batch_size=4, max_steps=6, warmup_steps=1,
                  eval_interval=3, eval_examples=4, eval_max_new_tokens=4, save_interval=3, lora_r=4,
                  lora_targets=("q", "v", "head"))
    values.update(overrides)
    return LoRAArgs(**values)


def logged(out_dir, column):
    (log_file,) = (Path(out_dir) / "logs").glob("version_*/metrics.csv")
    with open(log_file) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def weights(out_dir):
    return read_lora_file(Path(out_dir) / "lit_lora_finetuned.pth")["lora"]


def interrupt_at(monkeypatch, module, name, call):
    """Replace module.name by a wrapper that raises KeyboardInterrupt (a Ctrl-C) at its `call`-th call."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    return real


# Where a Ctrl-C lands in a run of 4 steps of 2 micro batches, evaluating and saving after step 2: each time the
# optimizer has completed 2 steps, and the state must say so (the step in progress, if any, is redone).
# loss_sum's calls: 1-4 for steps 1 and 2, 5 for the validation loss after step 2, 6 and 7 for step 3.
INTERRUPTS = {
    "in the forward pass": ("lit_lora.train", "loss_sum", 6),  # the first micro batch of step 3
    "between micro batches": ("lit_lora.train", "loss_sum", 7),  # the second micro batch of step 3
    "in evaluation": ("lit_lora.train", "evaluate", 1),  # after step 2
    "in saving": ("finetune.lora", "save_lora", 1),  # writing step-000002
}


# ---------------------------------------------------------------------------------------------------------
# What autograd saves, for the memory model (lit_lora/memory.py)


def saved_by_autograd(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in the training forward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum(model, input_ids, labels)
    return sum(storages.values())


# model.py's preset families, scaled down until autograd runs them in milliseconds, keeping the ratios that shape
# what is saved: query heads per key/value head, and the MLP width against n_embd.
FAMILIES = {
    # LLaMA 7B: multi-head (32 heads, 32 key/value heads); intermediate_size derived from n_embd (11008 = 2.69 x
    # 4096 for 7B, 256 = 2.67 x 96 here)
    "7B": dict(n_head=4, n_embd=96),
    # Llama-2-70b (and TinyLlama): grouped-query, 8 query heads per key/value head (64 and 8); intermediate_size
    # given, 3.5 x n_embd (28672 = 3.5 x 8192)
    "Llama-2-70b": dict(n_head=16, n_query_groups=2, n_embd=64, intermediate_size=224),
    # OpenLLaMA 3B: multi-head; intermediate_size given, not derived from n_embd (8640 = 2.7 x 3200; derived: 8704)
    "open_llama_3b": dict(n_head=4, n_embd=80, intermediate_size=216),
}


# ---------------------------------------------------------------------------------------------------------
# Scripts run as a user runs them

ROOT = Path(__file__).resolve().parents[1]


def run_command(script: str, *args) -> tuple[int, str, str]:
    """Run `python SCRIPT ARGS` (script relative to the repository root) in this process, so that stand-ins set with
    monkeypatch apply: its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, sigint = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [str(ROOT / script), *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, sigint)  # a finished script ignores Ctrl-C (lit_lora/cli.py): not pytest
    return code, stdout.getvalue(), stderr.getvalue()


def hidden_leftovers(out_dir: Path) -> list[Path]:
    """The hidden files and folders in a run's out_dir that are not its run lock (.lock, lit_lora/resume.py): what
    an interrupted write would leave (.NAME.XXXX.tmp, .NAME.old-XXXX)."""
    return [path for path in Path(out_dir).glob(".*") if path.name != ".lock"]
