"""Checkpoint I/O: the base model's folder, and the files a finetuning method writes beside it.

A checkpoint folder is the unit every script reads and full finetuning writes:
    lit_model.pth       the model's state dict
    model_config.json   the `Config` it was built from
    the tokenizer       either tokenizer.model (SentencePiece: LLaMA 1 and 2), or tokenizer.json (Hugging Face
                        `tokenizers`: Llama 3, SmolLM2) with whichever of tokenizer_config.json,
                        generation_config.json and special_tokens_map.json came with it (`Tokenizer.files`)

A method file (a LoRA file, an adapter file) is self-describing: its tensors, the config to rebuild its modules,
the base model's config and a fingerprint of its weights (`save_method_file`, `read_method_file`). What the
tensors are and how they enter a model is the method's own business (lit_lora/method_files.py).

Everything read from a file is checked before it is used, and every problem is one error naming the file, the
field or tensor, and what to do.
"""

import hashlib
import json
import math
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from lit_lora.files import (
    atomic_folder,
    atomic_save,
    check_links,
    file_sha256,
    load_torch_file,
    read_json,
)
from lit_lora.model import Config, ConfigError, LLaMA
from lit_lora.tokenizer import Tokenizer

# What a checkpoint folder must hold: each entry is a file, or a tuple of files of which it must hold one
CHECKPOINT_FILES = ("lit_model.pth", "model_config.json", ("tokenizer.model", "tokenizer.json"))
HOW_TO_GET_A_CHECKPOINT = (
    "Download and convert weights with `python checkpoints/download.py --repo_id ORG/NAME` and "
    "`python checkpoints/convert_hf.py` (see howto/download_weights.md), or pretrain a small one with "
    "`python finetune/full.py --from_scratch true` (see howto/finetune_full.md)."
)


def check_checkpoint_dir(checkpoint_dir: Union[str, Path]) -> Path:
    """Fail early, naming the folder, what it lacks and how to get it."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_file() and checkpoint_dir.suffix == ".gguf":
        raise FileNotFoundError(f"{checkpoint_dir} is a GGUF file, not a checkpoint folder: convert it with `python "
                                f"checkpoints/convert_gguf.py --gguf_path {checkpoint_dir}` (howto/gguf.md)")
    if not checkpoint_dir.is_dir():
        where = "" if checkpoint_dir.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(f"Checkpoint folder {str(checkpoint_dir)!r} does not exist{where}. "
                                f"{HOW_TO_GET_A_CHECKPOINT}")
    if not (checkpoint_dir / "lit_model.pth").exists() and (checkpoint_dir / "config.json").is_file() and any(
            checkpoint_dir.glob("*.safetensors")) | any(checkpoint_dir.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{checkpoint_dir} is a Hugging Face model folder (config.json and its weights), not "
                                "yet a lit-lora checkpoint: convert it first with `python checkpoints/convert_hf.py "
                                f"--hf_dir {checkpoint_dir}` (it writes lit_model.pth and model_config.json beside them)")
    missing = []
    for names in CHECKPOINT_FILES:
        names = (names,) if isinstance(names, str) else names
        if not any((checkpoint_dir / name).is_file() for name in names):
            missing.append(" or ".join(names))
    if missing:
        raise FileNotFoundError(
            f"Checkpoint folder {str(checkpoint_dir)!r} lacks {', '.join(missing)}. {HOW_TO_GET_A_CHECKPOINT}"
        )
    check_links(checkpoint_dir)
    return checkpoint_dir


def read_config(path: Union[str, Path]) -> Config:
    """A model_config.json, every field checked: a value it cannot hold is an error naming the file and field."""
    values, known = read_json(Path(path), "convert the checkpoint again"), {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown Config field(s) {unknown}; known fields: {sorted(known)}")
    try:
        config = checked_config(**values)
        if "prompt" in config.extra:  # a full finetune's format (finetune/full.py records it)
            check_prompt_format(config.extra["prompt"], "extra.prompt")
        return config
    except ConfigError as error:
        raise ValueError(f"{path}: {error.field} is {error.value!r}: {error.requirement}") from None


def checked_config(**values) -> Config:
    """Config(**values), each value checked first (model.py's Config trusts its caller): a ConfigError names the
    first field it cannot hold. Everything that builds a Config from a file or a flag builds it here."""
    for name in ("block_size", "vocab_size", "padding_multiple", "padded_vocab_size", "n_layer", "n_head",
                 "n_query_groups", "n_embd", "intermediate_size"):
        value = values.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(name, value, "must be a whole number, at least 1")
    for name, kind, words in (("name", str, "text"), ("tie_embeddings", bool, "true or false"), ("extra", dict, "an object")):
        if name in values and type(values[name]) is not kind:
            raise ConfigError(name, values[name], f"must be {words}")
    scaling = values.get("rope_scaling")
    if scaling is not None and (type(scaling) is not dict or sorted(scaling) != sorted(ROPE_SCALING_FIELDS)):
        raise ConfigError("rope_scaling", scaling, f"must be null or hold {', '.join(ROPE_SCALING_FIELDS)}")
    for name, value in {**{k: values[k] for k in ("norm_eps", "rope_base") if k in values}, **(scaling or {})}.items():
        if type(value) not in (int, float) or not 0 < value < math.inf:  # also refuses NaN
            raise ConfigError(name, value, "must be a positive, finite number")
    if scaling is not None and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("high_freq_factor", scaling["high_freq_factor"], "must exceed low_freq_factor")
    config = Config(**values)  # the sizes left out are derived here
    if config.padded_vocab_size < config.vocab_size:
        raise ConfigError("padded_vocab_size", config.padded_vocab_size, f"must be >= vocab_size ({config.vocab_size})")
    if config.n_embd % (2 * config.n_head):  # RoPE rotates pairs: each head's size must be even
        raise ConfigError("n_embd", config.n_embd, f"must be divisible by 2 n_head ({2 * config.n_head})")
    if config.n_head % config.n_query_groups:
        raise ConfigError("n_head", config.n_head, f"must be divisible by n_query_groups ({config.n_query_groups})")
    return config


ROPE_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_context")  # Llama 3.1's
# The names of lit_lora/prompts.py's PROMPT_STYLES, which the core cannot import (tests/test_hostile.py keeps them equal)
PROMPT_STYLE_NAMES = ("alpaca", "llama3", "chatml", "chat_template")


def check_prompt_format(prompt_format, field: str) -> dict:
    """A recorded prompt format ({style, system_prompt, chat_template_sha256}), as a method file or a full
    finetune's model_config.json holds it: a known style, a system prompt that is text (or null), the template's
    sha256 as 64 hex digits (or null). Anything else is a ConfigError naming `field`."""
    keys = ("style", "system_prompt", "chat_template_sha256")
    if type(prompt_format) is not dict or not set(prompt_format) <= set(keys) or "style" not in prompt_format:
        raise ConfigError(field, prompt_format, f"must be null or an object with {', '.join(keys)}")
    style, system_prompt = prompt_format["style"], prompt_format.get("system_prompt")
    digest = prompt_format.get("chat_template_sha256")
    if style not in PROMPT_STYLE_NAMES:
        raise ConfigError(f"{field}.style", style, f"must be one of {', '.join(PROMPT_STYLE_NAMES)}")
    if system_prompt is not None and (type(system_prompt) is not str or not is_utf8(system_prompt)):
        raise ConfigError(f"{field}.system_prompt", shorten(system_prompt), "must be null or text (valid UTF-8)")
    if digest is not None and (type(digest) is not str or not re.fullmatch("[0-9a-f]{64}", digest)):
        raise ConfigError(f"{field}.chat_template_sha256", shorten(digest), "must be null or 64 hex digits (a sha256)")
    return prompt_format


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


def shorten(value, limit: int = 60):
    """A value as an error message shows it: a long text cut, so that one line stays one line."""
    return value[:limit] + f"... ({len(value):,} characters)" if isinstance(value, str) and len(value) > limit else value


def load_model(checkpoint_dir: Union[str, Path], dtype: Optional[torch.dtype] = None,
               verify: Optional[bool] = None) -> LLaMA:
    """Build the model on the meta device (no memory) and point its parameters at the checkpoint's
    tensors, memory-mapped from disk: loading 7B never needs two copies in RAM.

    The tensors stay on the CPU, in the checkpoint's dtype unless `dtype` is given; moving the model to a
    GPU (e.g. by `fabric.setup`) then reads them from disk once. The model remembers a fingerprint of these
    weights (`model.base_fingerprint`), which LoRA and adapter files record to recognise their base model.
    (lit_lora/quantize.py's load_model_4bit stores the Blocks' weights in 4 bits instead.)

    verify: check lit_model.pth against the sha256 recorded when it was written, and its weights for NaN (see
    `verify_weights`); None: where that is cheap, for files up to VERIFY_UP_TO bytes.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = read_config(checkpoint_dir / "model_config.json")
    check_vocabulary(config, checkpoint_dir)
    with torch.device("meta"), no_random_init():
        model = LLaMA(config)
    weights_file = checkpoint_dir / "lit_model.pth"
    state_dict = load_tensors(weights_file)
    if config.tie_embeddings and "embed.weight" in state_dict:  # one matrix, saved under one name or both
        state_dict.setdefault("lm_head.weight", state_dict["embed.weight"])
    check_tensors(state_dict, {name: t.shape for name, t in model.state_dict().items()}, weights_file)
    if verify or (verify is None and weights_file.stat().st_size <= VERIFY_UP_TO):
        verify_weights(weights_file, state_dict)
    model.base_fingerprint = weights_fingerprint(state_dict)  # of the weights as stored, before any conversion
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True gave each name its own parameter: make them one again
        model.lm_head.weight = model.embed.weight
    model.reset_rope_cache()  # cos/sin are not in the checkpoint: build them on the weights' device
    model.prompt_format = config.extra.get("prompt")  # a full finetune's format (finetune/full.py records it), or None
    return model


@contextmanager
def no_random_init() -> Iterator[None]:
    """Skip the random fill of weights a checkpoint replaces: on the meta device its first call costs seconds of imports."""
    init, saved = torch.nn.init, (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_)
    init.normal_ = init.kaiming_uniform_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        init.normal_, init.kaiming_uniform_ = saved


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, memory-mapped; a clear error for a file that is not one."""
    state_dict = load_torch_file(path, "a state dict saved by torch.save", f"convert or download it again. "
                                 f"{HOW_TO_GET_A_CHECKPOINT}", mmap=True)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors. {HOW_TO_GET_A_CHECKPOINT}")
    return state_dict


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], source: Union[str, Path],
                  hint: str = "") -> None:
    """Every expected tensor, no other, each a floating-point tensor of its expected shape: else an error naming
    the first few missing, unexpected, misshapen or non-float tensors of `source`, and `hint` (what to do)."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit: missing tensors: {missing[:3]}; unexpected: {unexpected[:3]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected). {hint}".strip())
    wrong = [f"{name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}" for name, t in tensors.items()
             if tuple(t.shape) != tuple(expected[name])]
    wrong += [f"{name} holds {t.dtype}, not floating-point weights" for name, t in tensors.items()
              if not t.is_floating_point()]
    if wrong:
        raise ValueError(f"{source} does not fit: {'; '.join(wrong[:3])} ({len(wrong)} such). {hint}".strip())


# The config fields that decide every tensor's shape: a LoRA or adapter file fits a base model only if they agree.
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "padded_vocab_size")


def check_base_model(method_file: dict, config: Config, path: Union[str, Path],
                     base_fingerprint: Optional[str] = None, base: str = "this model") -> None:
    """Whether a LoRA or adapter file (its dict, with base_config and base_fingerprint) fits a base model of
    `config` (and, if known, whose weights have `base_fingerprint`). Another shape is an error; the same shape
    but other weights (another finetune of the same architecture, say) is a warning, since the file loads but
    what it learned was learned on top of other weights. `base` names the base model in the messages."""
    saved_config = method_file["base_config"]
    for field in SHAPE_FIELDS:
        if saved_config.get(field) != getattr(config, field):
            raise ValueError(f"{path} was trained on another base model ({saved_config.get('name') or 'unnamed'}): "
                             f"its {field} is {saved_config.get(field)}, {base}'s is {getattr(config, field)}. "
                             "Load the base checkpoint it was trained on.")
    saved = method_file.get("base_fingerprint")
    if saved and base_fingerprint and saved != base_fingerprint:
        print(f"Warning: {path} was trained on other base weights than these (fingerprint {saved}, {base}'s "
              f"{base_fingerprint}): it fits their shape, but its update was learned on top of other weights, so "
              "the results may be poor. Load the base checkpoint it was trained on.", file=sys.stderr)


def check_vocabulary(config: Config, tokenizer_path: Union[str, Path]) -> None:
    """A tokenizer with more pieces than the model has embeddings would produce ids the model cannot embed.
    `tokenizer_path`: a tokenizer file, or a folder with one (as `Tokenizer` takes it)."""
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{tokenizer.model_path} has {tokenizer.vocab_size:,} tokens, more than the model's vocabulary "
                         f"of {config.vocab_size:,} (its config's vocab_size): the tokenizer belongs to another "
                         f"model. Use the {tokenizer.model_path.name} the weights came with.")


def weights_fingerprint(state_dict: dict[str, torch.Tensor], samples: int = 256) -> str:
    """A cheap identity of a model's weights, never a hash of gigabytes: sha256 of `samples` values spread
    evenly over each of a few tensors (the embedding, the first and last Block's weights, the norm, lm_head),
    rounded to bf16, so a model and its copy converted to bf16 agree (an fp16 copy of fp32 weights may not:
    rounding twice can land elsewhere). Reads a few pages of a memory-mapped file."""
    n_layer = 1 + max((int(name.split(".")[1]) for name in state_dict if name.startswith("blocks.")), default=0)
    chosen = [name for name in sorted(state_dict) if not name.startswith("blocks.")
              or name.startswith(("blocks.0.", f"blocks.{n_layer - 1}."))]
    digest = hashlib.sha256()
    for name in chosen:
        flat = state_dict[name].reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(name.encode() + bytes(flat[::step][:samples].to(torch.bfloat16).contiguous().view(torch.uint8).tolist()))
    return digest.hexdigest()[:16]


def save_checkpoint_dir(checkpoint_dir: Union[str, Path], state_dict: dict, config: Config,
                        tokenizer_files: list[Union[str, Path]], texts: Optional[dict[str, str]] = None) -> Path:
    """Write a whole checkpoint folder (see the module docstring) that `load_model` and every script read.

    `tokenizer_files`: every file the tokenizer was read from, `Tokenizer(path).files`. Each is copied in under its
    own name, but a SentencePiece model (`Tokenizer.train` may name it NAME.model) as tokenizer.model; `texts`
    (file name -> text) are written beside them (the chat template, where it came inside another file). The files
    are written into a temporary folder first (atomic_folder): a new folder appears whole; in an existing one each
    file appears whole, and other files (logs, say) are left alone.
    """
    if isinstance(tokenizer_files, (str, Path)):
        raise TypeError(f"save_checkpoint_dir takes a list of tokenizer files, not the one path {str(tokenizer_files)!r}: "
                        "pass Tokenizer(path).files")
    names = {Path(file): "tokenizer.model" if Path(file).suffix == ".model" else Path(file).name for file in tokenizer_files}
    if not {"tokenizer.model", "tokenizer.json"} & set(names.values()):
        raise ValueError(f"The tokenizer files {[str(file) for file in names]} hold no tokenizer.model or tokenizer.json, "
                         "one of which every checkpoint folder needs: pass Tokenizer(path).files")
    with atomic_folder(checkpoint_dir) as tmp:
        torch.save(state_dict, tmp / "lit_model.pth")
        (tmp / CHECKSUMS).write_text(json.dumps({"lit_model.pth": file_sha256(tmp / "lit_model.pth")}, indent=2))
        write_config(config, tmp / "model_config.json")
        for file, name in names.items():
            shutil.copyfile(file, tmp / name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(checkpoint_dir)


# Checking the weights against what was written. Hashing reads the whole file (about a second per GB); for larger
# files load_model leaves it to `verify=True` (export_hf.py verifies what it exports).
CHECKSUMS = "checksums.json"  # {"lit_model.pth": its sha256}, written with every checkpoint folder
VERIFY_UP_TO = 2_000_000_000  # bytes


def verify_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """`path` (lit_model.pth) holds what was written (the sha256 in checksums.json beside it, where there is one),
    and finite weights: a flipped bit, a damaged copy or an edit is one error, never garbage."""
    recorded = read_json(path.parent / CHECKSUMS, "convert or copy the checkpoint again", missing_ok=True).get(path.name)
    if recorded is not None and file_sha256(path) != recorded:
        raise ValueError(f"{path} is not the file that was written: its sha256 differs from the one recorded in "
                         f"{path.parent / CHECKSUMS} (a damaged or incomplete copy, a flipped bit, an edit). Convert "
                         "or copy the checkpoint again.")
    for name, tensor in state_dict.items():
        if not all_finite(tensor):
            raise ValueError(f"{path}: the tensor {name} holds NaN or infinite values. Convert or copy the "
                             "checkpoint again.")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`, in one reduction rather than an elementwise test: a sum is NaN or infinite
    exactly when a value is (weights never sum past their dtype's range; fp16's is small, so it is summed in fp32)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()))


def write_config(config: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(asdict(config), indent=2))


# ---------------------------------------------------------------------------------------------------------
# Method files: what LoRA and LLaMA-Adapter write ({kind}: the tensors, {kind}_config: the method's config)


def save_method_file(path: Union[str, Path], kind: str, tensors: dict[str, torch.Tensor], config,
                     model: LLaMA, **extra) -> None:
    """One self-describing file, written whole: the method's tensors and config (a dataclass), the base model's
    config and fingerprint, and `extra` (e.g. the quantization the base was trained in)."""
    atomic_save({kind: {name: tensor.detach().cpu() for name, tensor in tensors.items()},
                 f"{kind}_config": asdict(config),
                 "base_config": asdict(model.config),
                 "base_fingerprint": getattr(model, "base_fingerprint", None),  # which base weights it was trained on
                 **extra}, path)


def read_method_file(path: Union[str, Path], kind: str, config_class: type, name: str, writer: str,
                     optional: tuple[str, ...] = ()) -> dict:
    """The dict of a method file `kind` ("lora", "adapter"), everything checked: its config builds a
    `config_class`, its base_config a Config, its tensors are finite floats; else one error naming the file, the
    field or tensor and what to do. `name`: what the file is called in messages ("a LoRA file"); `writer`: the
    script that writes such files; `optional`: keys besides the base ones that the file may hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {writer} writes {name}")
    data = load_torch_file(path, name, f"write it again with {writer}")
    required = {kind, f"{kind}_config", "base_config"}
    allowed = required | {"base_fingerprint", *optional}
    if not isinstance(data, dict) or not required <= set(data) <= allowed:
        found = sorted(map(str, data)) if isinstance(data, dict) else f"a {type(data).__name__}"
        raise ValueError(f"{path} is not {name} written by lit-lora: expected the keys {sorted(required)}, "
                         f"found {found}. {writer} writes one.")
    config_values, known = data[f"{kind}_config"], {f.name for f in fields(config_class)}
    if not isinstance(config_values, dict) or set(config_values) != known:
        found = sorted(config_values) if isinstance(config_values, dict) else f"a {type(config_values).__name__}"
        raise ValueError(f"{path}: {kind}_config holds {found}, expected the fields {sorted(known)}. "
                         f"Write the file again with {writer}.")
    try:
        config_class(**config_values)
    except ConfigError as error:
        raise ValueError(f"{path}: {kind}_config's {error.field} is {error.value!r}: {error.requirement}. "
                         f"Write the file again with {writer}.") from None
    try:
        checked_config(**data["base_config"])
    except (ConfigError, TypeError) as error:  # TypeError: not a dict, or unknown fields
        raise ValueError(f"{path}: base_config is not a model config ({error}). Write the file again with "
                         f"{writer}.") from None
    try:
        if data.get("prompt") is not None:
            check_prompt_format(data["prompt"], "prompt")
    except ConfigError as error:
        raise ValueError(f"{path}: the recorded prompt format's {error.field} is {error.value!r}: {error.requirement}. "
                         f"Write the file again with {writer}.") from None
    tensors = data[kind]
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path}: {kind} holds no state dict of tensors. Write the file again with {writer}.")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not all_finite(tensor):
            what = "NaN or infinite values" if tensor.is_floating_point() else f"{tensor.dtype}, not floats"
            raise ValueError(f"{path}: the tensor {name} holds {what}: training diverged, or the file is damaged "
                             f"or was edited. Write it again with {writer}.")
    return data
