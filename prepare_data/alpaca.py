"""Prepare the cleaned Alpaca dataset (about 52K instructions) for finetuning.

    python prepare_data/alpaca.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Downloads alpaca_data_cleaned_archive.json from the tloen/alpaca-lora repository, at a fixed commit, unless
--data_file names a local copy, then writes data/alpaca/{train,test}.pt. The test split of 2000 is
Alpaca-LoRA's.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lit_lora.cli import cli
from lit_lora.data import PrepareArgs, check_destination, prepare_records
from lit_lora.data_files import check_sha256, download, load_records
from lit_lora.tokenizer import Tokenizer

# A fixed commit of tloen/alpaca-lora, not the head of a branch that can move: every download is the same file.
COMMIT = "8bb8579e403dc78e37fe81ffbb253c413007323f"
URL = f"https://raw.githubusercontent.com/tloen/alpaca-lora/{COMMIT}/alpaca_data_cleaned_archive.json"
# The file's sha256 is not known yet (it could not be computed where this was written: no internet). Until it
# is filled in here, each run prints the file's sha256 and records it in prepare_config.json, unchecked.
SHA256 = None


@dataclass
class AlpacaArgs(PrepareArgs):
    """Prepare Alpaca (instruction, input, output records).

    Args:
        allow_checksum_mismatch: Prepare a data file whose sha256 is not the one recorded for the dataset.
    """

    destination_path: Path = Path("data/alpaca")
    max_seq_length: int = 256
    test_split_size: Union[int, float] = 2000
    allow_checksum_mismatch: bool = False


def main(args: AlpacaArgs) -> dict:
    tokenizer = Tokenizer(args.checkpoint_dir)  # first: a missing model is said before any download
    check_destination(args.destination_path)
    data_file = args.data_file or download(URL, args.destination_path.parent / "alpaca_data_cleaned_archive.json")
    sha256 = check_sha256(data_file, SHA256, args.allow_checksum_mismatch, given=args.data_file is not None)
    return prepare_records(load_records(data_file), args, tokenizer, source=data_file, source_sha256=sha256)


if __name__ == "__main__":
    cli(main, AlpacaArgs)
