"""Prepare databricks-dolly-15k (15K human-written instructions) for finetuning.

    python prepare_data/dolly.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Dolly's records are {instruction, context, response, category}: context becomes the template's input and
response its output. The file is downloaded from the Hugging Face dataset repository at a fixed revision
unless --data_file names a local copy.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lit_lora.cli import cli
from lit_lora.data import PrepareArgs, check_destination, prepare_records
from lit_lora.data_files import check_sha256, download, load_records
from lit_lora.tokenizer import Tokenizer

# A fixed revision (commit) of the dataset repository, not the head of its main branch, which can move.
REVISION = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a"
URL = f"https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/{REVISION}/databricks-dolly-15k.jsonl"
SHA256 = "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec"  # of that file: 15,011 records


@dataclass
class DollyArgs(PrepareArgs):
    """Prepare Dolly (context -> input, response -> output).

    Args:
        allow_checksum_mismatch: Prepare a data file whose sha256 is not the one recorded for the dataset.
    """

    destination_path: Path = Path("data/dolly")
    max_seq_length: int = 1024
    test_split_size: Union[int, float] = 2000
    allow_checksum_mismatch: bool = False


def main(args: DollyArgs) -> dict:
    tokenizer = Tokenizer(args.checkpoint_dir)  # first: a missing model is said before any download
    check_destination(args.destination_path)
    data_file = args.data_file or download(URL, args.destination_path.parent / "databricks-dolly-15k.jsonl")
    sha256 = check_sha256(data_file, SHA256, args.allow_checksum_mismatch, given=args.data_file is not None)
    records = load_records(data_file, instruction_key="instruction", input_key="context", output_key="response")
    return prepare_records(records, args, tokenizer, source=data_file, source_sha256=sha256)


if __name__ == "__main__":
    cli(main, DollyArgs)
