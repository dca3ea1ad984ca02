"""Checkpoint I/O and the figures every script reports (parameters, memory).

A checkpoint folder is the unit every script reads and full finetuning writes:
    lit_model.pth       the model's state dict
    model_config.json   the `Config` it was built from
    the tokenizer       either tokenizer.model (SentencePiece: LLaMA 1 and 2), or tokenizer.json (Hugging Face
                        `tokenizers`: Llama 3, SmolLM2) with whichever of tokenizer_config.json,
                        generation_config.json and special_tokens_map.json came with it (`Tokenizer.files`)
"""

import hashlib
import os
import resource
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn

from lit_lora.model import Config, LLaMA
from lit_lora.quantize import is_4bit, quantize_blocks

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
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {str(checkpoint_dir)!r} does not exist. {HOW_TO_GET_A_CHECKPOINT}")
    missing = []
    for names in CHECKPOINT_FILES:
        names = (names,) if isinstance(names, str) else names
        if not any((checkpoint_dir / name).is_file() for name in names):
            missing.append(" or ".join(names))
    if missing:
        raise FileNotFoundError(
            f"Checkpoint folder {str(checkpoint_dir)!r} lacks {', '.join(missing)}. {HOW_TO_GET_A_CHECKPOINT}"
        )
    return checkpoint_dir


def load_model(checkpoint_dir: Union[str, Path], dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
               device: Optional[torch.device] = None) -> LLaMA:
    """Build the model on the meta device (no memory) and point its parameters at the checkpoint's
    tensors, memory-mapped from disk: loading 7B never needs two copies in RAM.

    The tensors stay on the CPU, in the checkpoint's dtype unless `dtype` is given; moving the model to a
    GPU (e.g. by `fabric.setup`) then reads them from disk once. The model remembers a fingerprint of these
    weights (`model.base_fingerprint`), which LoRA and adapter files record to recognise their base model.

    quantize: "bnb.nf4" or "bnb.nf4-dq" (QLoRA, lit_lora/quantize.py): the Blocks' linear weights are read from
    the file one at a time and stored in 4 bits on `device` (default: a GPU if there is one), so the 16-bit
    model is never in memory at once; the rest stays as above.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_file(checkpoint_dir / "model_config.json")
    check_vocabulary(config, checkpoint_dir)
    with torch.device("meta"):
        model = LLaMA(config)
    state_dict = load_tensors(checkpoint_dir / "lit_model.pth")
    if config.tie_embeddings and "embed.weight" in state_dict:  # one matrix, saved under one name or both
        state_dict.setdefault("lm_head.weight", state_dict["embed.weight"])
    check_tensors(state_dict, {name: t.shape for name, t in model.state_dict().items()}, checkpoint_dir / "lit_model.pth")
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True gave each name its own parameter: make them one again
        model.lm_head.weight = model.embed.weight
    model.reset_rope_cache()  # cos/sin are not in the checkpoint: build them on the weights' device
    model.base_fingerprint = weights_fingerprint(state_dict)  # of the weights as stored: the same when quantized
    if quantize is not None:  # QLoRA: the Blocks' linears in 4 bits
        # without `dtype` the weights are the file's own memory-mapped tensors, not copies in ordinary memory
        quantize_blocks(model, quantize, device, free_mapped_pages=dtype is None)
    return model


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, memory-mapped; a clear error for a file that is not one."""
    try:
        state_dict = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # empty, truncated, random, an old (pre-zip) torch format, or a pickle with code
        raise ValueError(f"{path} cannot be read as a state dict saved by torch.save ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}). It may be incomplete or damaged: "
                         f"convert or download it again. {HOW_TO_GET_A_CHECKPOINT}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors. {HOW_TO_GET_A_CHECKPOINT}")
    return state_dict


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], source: Union[str, Path],
                  hint: str = "") -> None:
    """Every expected tensor, no other, each with its expected shape: else an error naming the first few
    missing, unexpected or misshapen tensors of `source`, and `hint` (what to do)."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit: missing tensors: {missing[:3]}; unexpected: {unexpected[:3]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected). {hint}".strip())
    wrong = [f"{name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}" for name, t in tensors.items()
             if tuple(t.shape) != tuple(expected[name])]
    if wrong:
        raise ValueError(f"{source} does not fit: {'; '.join(wrong[:3])} ({len(wrong)} of another shape). "
                         f"{hint}".strip())


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
    from lit_lora.tokenizer import Tokenizer

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


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def save_checkpoint_dir(checkpoint_dir: Union[str, Path], state_dict: dict, config: Config,
                        tokenizer_files: list[Union[str, Path]]) -> Path:
    """Write a whole checkpoint folder (see the module docstring) that `load_model` and every script read.

    `tokenizer_files`: every file the tokenizer was read from, `Tokenizer(path).files`. Each is copied in under its
    own name, but a SentencePiece model (`Tokenizer.train` may name it NAME.model) as tokenizer.model. The files
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
        config.to_file(tmp / "model_config.json")
        for file, name in names.items():
            shutil.copyfile(file, tmp / name)
    return Path(checkpoint_dir)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(temporary path) for a file beside `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files only their owner can read; use the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: Union[str, Path], replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `path` to write files into; when the block succeeds, put them in place.

    A new `path` is the temporary folder renamed, in one step. An existing `path` either gets the new files
    moved in one by one (each file appears whole; other files stay), or with `replace=True` is swapped for the
    new folder: the old one is renamed aside, the new one renamed in, then the old one deleted, so a complete
    folder exists at every moment (after a crash between the two renames, under the hidden name
    `.NAME.old-*/NAME`). An error leaves `path` as it was and removes the temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes folders only their owner can read; use the usual mode
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif replace:
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            try:
                os.replace(path, aside / path.name)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(aside / path.name, path)  # an error, not a crash: the old folder goes back
                    raise
            finally:
                if path.exists():  # the new folder or the old one is in place: what is aside is not needed
                    shutil.rmtree(aside, ignore_errors=True)
        else:
            for file in sorted(tmp.iterdir()):
                os.replace(file, path / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def num_parameters(module: nn.Module, trainable: Optional[bool] = None) -> int:
    """Parameters of `module`: all of them, or only the (non-)trainable ones. Works on the meta device.
    A 4-bit weight (QLoRA) counts the weights it holds, not its bytes (two weights per byte)."""
    def count(p: torch.Tensor) -> int:  # a 4-bit weight: the shape it was quantized from
        return p.quant_state.shape.numel() if is_4bit(p) else p.numel()

    return sum(count(p) for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size (RSS).

    On Linux the RSS peak is VmHWM of /proc/self/status: getrusage's ru_maxrss would count the RSS of the
    process that started this one too (Linux carries it over fork and exec), so a run started by a big process
    (finetune/compare.py) would report that process's memory."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if sys.platform == "linux":
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the BSDs kilobytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def default_precision() -> str:
    """bf16 weights on a GPU that supports bfloat16, fp32 otherwise (CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def dtype_from_precision(precision: str) -> torch.dtype:
    """The dtype of the weights for a Fabric precision string ('bf16-mixed' keeps fp32 weights)."""
    dtypes = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16,
              "bf16-mixed": torch.float32, "16-mixed": torch.float32}
    if precision not in dtypes:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(dtypes)}")
    return dtypes[precision]


# ---------------------------------------------------------------------------------------------------------
# Scripts: flags and errors


def check_flag(args: Any, name: str, ok: bool, requirement: str) -> None:
    """Refuse the value of flag `name` unless `ok`, with a message naming the flag, its value and `requirement`.

    Each script's dataclass of flags calls this in `__post_init__`, so a bad value stops the script while its
    arguments are parsed, before anything is read or written."""
    if not ok:
        raise ValueError(f"--{name} {getattr(args, name)}: {requirement}")


# What a user can fix: a bad flag, a missing, damaged or mismatched file, a missing optional package.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def cli(main: Callable, flags: Optional[type] = None) -> Any:
    """What every script runs under `if __name__ == "__main__"`: parse the command line with jsonargparse
    (`--help` lists each flag with its default) and call `main`, with the parsed dataclass `flags`, or, without
    `flags`, with main's own arguments as the flags.

    Errors a user can fix end in one line on stderr, `error: ...`, not in a traceback: exit code 2 for a flag
    value refused while parsing, 1 for a problem found later (a missing or damaged file, a mismatch). Ctrl-C
    ends with exit code 130. Set LIT_LORA_TRACEBACK=1 to see the traceback of any of them.
    """
    from jsonargparse import CLI  # here, so that importing lit_lora.utils stays light

    def fail(error: BaseException, code: int):
        if os.environ.get("LIT_LORA_TRACEBACK"):
            raise error
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)

    try:
        if flags is None:
            return CLI(main, as_positional=False)
        try:
            args = CLI(flags, as_positional=False)
        except ValueError as error:  # refused by the dataclass's __post_init__ (check_flag)
            fail(error, 2)
        return main(args)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as error:
        fail(error, 1)
