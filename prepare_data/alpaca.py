"""Prepare the cleaned Alpaca dataset (about 52K instructions) for finetuning.

    python prepare_data/alpaca.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Downloads alpaca_data_cleaned_archive.json from the tloen/alpaca-lora repository unless --data_file names a
local copy, then writes data/alpaca/{train,test}.pt. The test split of 2000 is Alpaca-LoRA's.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Union


from lit_lora.data import PrepareArgs, download, load_records, prepare_records
from lit_lora.utils import cli

URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json"


@dataclass
class AlpacaArgs(PrepareArgs):
    """Prepare Alpaca (instruction, input, output records)."""

    destination_path: Path = Path("data/alpaca")
    max_seq_length: int = 256
    test_split_size: Union[int, float] = 2000


def main(args: AlpacaArgs) -> dict:
    data_file = args.data_file or download(URL, args.destination_path.parent / "alpaca_data_cleaned_archive.json")
    return prepare_records(load_records(data_file), args, source=data_file)


if __name__ == "__main__":
    cli(main, AlpacaArgs)
