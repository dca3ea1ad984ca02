"""Files written whole or not at all, and files from outside read with one clear error.

Writing. Every file lit-lora writes (a checkpoint, a LoRA file, prepared data, a resumable state) is first written
under a hidden temporary name beside its destination, then renamed onto it. A rename within a folder is atomic: a
crash, a kill or Ctrl-C leaves either the old file or the new one, never half of one. A write that fails for want
of space is said as such ("No space left on device writing <path>"), whatever the writer called it.

Reading. A file may be empty, truncated, damaged, of another format or hostile (a pickle that would run code):
`read_json` and `load_torch_file` turn every such failure into one error that names the file, what it should be,
and what to do.
"""

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch

# ---------------------------------------------------------------------------------------------------------
# Writing


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What writers say when the disk is full: the OS (ENOSPC), torch.save's C++ stream, safetensors
NO_SPACE_WORDS = ("no space left", "unexpected pos", "iostream error", "file write failed")


def no_space_error(error: BaseException, path: Path, folder: Path) -> OSError | None:
    """An OSError saying that the disk holding `folder` is full, if that is what `error` means, else None."""
    causes = [error, error.__cause__, error.__context__]
    if not any(getattr(cause, "errno", None) == errno.ENOSPC or
               any(words in str(cause).lower() for words in NO_SPACE_WORDS) for cause in causes if cause):
        return None
    free = shutil.disk_usage(folder).free
    return OSError(errno.ENOSPC, f"No space left on device writing {path} ({free:,} bytes free there): free some "
                                 "space or write somewhere else, then run the command again")


def atomic_write(path: Union[str, Path], write: Callable[[str], Any]) -> None:
    """Call write(temporary path) for a file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files only their owner can read; use the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        full = no_space_error(error, path, path.parent)
        if full is not None:
            raise full from None
        raise


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temporary file beside `path`, then rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder, and a folder is written there: choose another path, "
                              "or move the file away")
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
    except BaseException as error:
        full = no_space_error(error, path, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Reading


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):  # 1 MiB at a time: any size in little memory
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, hint: str, missing_ok: bool = False) -> dict:
    """The object in a JSON file ({} for a missing file if missing_ok); one error naming the file and `hint`, what
    to do, for a file that is missing, not JSON, nested too deeply, or not an object."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"No {path.name} at {path}: {hint}.")
    try:
        content = json_loads(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): {hint}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
                         f"{hint}.") from None
    except ValueError as error:
        raise ValueError(f"{error}: {hint}.") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object: {hint}.")
    return content


def json_loads(text: str, path: Union[str, Path]) -> Any:
    """json.loads, with the two failures of a text that parses but that Python cannot hold said as a ValueError
    naming `path`: lists or objects nested too deeply for its parser, a number of thousands of digits. Text that is
    not JSON raises json.JSONDecodeError, as json.loads does (the caller says where)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError(f"{path} is not a JSON file lit-lora can read: its lists or objects are nested too deeply "
                         "(thousands of levels)") from None
    except ValueError as error:  # Python refuses integers of more than 4300 digits
        raise ValueError(f"{path} is not a JSON file lit-lora can read: it holds a number of thousands of digits "
                         f"({str(error).split(';')[0]})") from None


def load_torch_file(path: Path, what: str, hint: str, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) of `path`, which should hold `what`; any failure (empty, truncated, random
    bytes, an old pre-zip format, a pickle that would run code) is one ValueError naming the file and `hint`.
    A file of another format that people mistake for it (GGUF, safetensors) is named as what it is."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:  # torch.load below says what is wrong
        head = b""
    if head[:4] == b"GGUF":
        raise ValueError(f"{path} is a GGUF file (llama.cpp's format), not {what}. A GGUF model becomes a checkpoint "
                         "folder with `python checkpoints/convert_gguf.py --gguf_path FILE` (howto/gguf.md); a LoRA or "
                         "adapter file is what finetune/lora.py or finetune/adapter.py writes.")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        raise ValueError(f"{path} is a safetensors file (Hugging Face's format), not {what}. Convert a Hugging Face "
                         "model with checkpoints/convert_hf.py, a PEFT adapter with checkpoints/import_peft.py "
                         "(howto/convert_and_export.md).")
    try:
        return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        if "weights_only" in detail or "Unsupported global" in str(error):
            detail = "it holds Python objects other than tensors, which are never loaded (they could run code)"
        raise ValueError(f"{path} cannot be read as {what} ({type(error).__name__}: {detail[:200]}). It may be "
                         f"incomplete or damaged: {hint}.") from None


def check_links(folder: Path) -> None:
    """Refuse a file of `folder` that is a symbolic link leading outside it: a model folder that can point anywhere
    could make a run read (and a conversion copy) any file on the machine. Hugging Face's cache is allowed: its
    snapshot folders (models--ORG--NAME/snapshots/REVISION) hold links into the same repository's blobs/ folder."""
    folder = Path(os.path.abspath(folder))
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(folder.parent.parent.resolve())  # the cached repository
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if not any(root == target or root in target.parents for root in roots):
                raise ValueError(f"{entry} is a link to {target}, outside {folder}: a model folder's files must be in "
                                 "it (or, in Hugging Face's cache, in the same repository). Copy the file in instead.")
