"""Prepare your own instructions: a JSON list or a JSONL file of records.

    python prepare_data/json_data.py --data_file my_data.json --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Each record has an instruction, an optional input and an output; if your fields have other names, say so:
--instruction_key question --output_key answer.
"""

from dataclasses import dataclass
from pathlib import Path

from lit_lora.cli import cli
from lit_lora.data import PrepareArgs, prepare_records
from lit_lora.data_files import load_records
from lit_lora.files import file_sha256
from lit_lora.tokenizer import Tokenizer


@dataclass
class JSONArgs(PrepareArgs):
    """Prepare a JSON or JSONL file of instruction records.

    Args:
        instruction_key: The field holding the instruction.
        input_key: The field holding the optional input (context).
        output_key: The field holding the response to learn.
    """

    destination_path: Path = Path("data/json")
    instruction_key: str = "instruction"
    input_key: str = "input"
    output_key: str = "output"


def main(args: JSONArgs) -> dict:
    if args.data_file is None:
        raise ValueError("json_data.py needs --data_file: a JSON list or JSONL file of records")
    tokenizer = Tokenizer(args.checkpoint_dir)  # first: a missing model is said before the data are read
    records = load_records(args.data_file, args.instruction_key, args.input_key, args.output_key)
    # your file has no checksum to check against; its sha256 in prepare_config.json tells later what was prepared
    return prepare_records(records, args, tokenizer, source=args.data_file, source_sha256=file_sha256(args.data_file))


if __name__ == "__main__":
    cli(main, JSONArgs)
