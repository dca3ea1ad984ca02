"""Prepare databricks-dolly-15k (15K human-written instructions) for finetuning.

    python prepare_data/dolly.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Dolly's records are {instruction, context, response, category}: context becomes the template's input and
response its output.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Union


from lit_lora.data import PrepareArgs, download, load_records, prepare_records
from lit_lora.utils import cli

URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


@dataclass
class DollyArgs(PrepareArgs):
    """Prepare Dolly (context -> input, response -> output)."""

    destination_path: Path = Path("data/dolly")
    max_seq_length: int = 1024
    test_split_size: Union[int, float] = 2000


def main(args: DollyArgs) -> dict:
    data_file = args.data_file or download(URL, args.destination_path.parent / "databricks-dolly-15k.jsonl")
    records = load_records(data_file, instruction_key="instruction", input_key="context", output_key="response")
    return prepare_records(records, args, source=data_file)


if __name__ == "__main__":
    cli(main, DollyArgs)
