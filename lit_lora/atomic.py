"""Files written whole or not at all.

Every file lit-lora writes (a checkpoint, a LoRA file, prepared data, a resumable state) is first written under a
hidden temporary name beside its destination, then renamed onto it. A rename within a folder is atomic: a crash,
a kill or Ctrl-C leaves either the old file or the new one, never half of one.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
