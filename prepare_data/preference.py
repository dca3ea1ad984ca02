"""Prepare preference pairs for DPO (finetune/dpo.py): a JSON list or a JSONL file of {prompt, chosen, rejected}.

    python prepare_data/preference.py --data_file pairs.jsonl --checkpoint_dir checkpoints/smollm2 \
        --prompt_style chat_template --destination_path data/pairs

A record is three strings (the prompt is an instruction, written in --prompt_style), or TRL's conversational format:
{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}. The loss
is on the answers' tokens only. See one prepared pair with prepare_data/inspect_data.py --data_dir data/pairs.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_lora.cli import check_flag, cli
from lit_lora.data import PrepareArgs
from lit_lora.files import file_sha256
from lit_lora.preference import load_preference_records, prepare_pairs
from lit_lora.tokenizer import Tokenizer


@dataclass
class PreferenceArgs(PrepareArgs):
    """Prepare a JSON or JSONL file of preference pairs.

    Args:
        max_prompt_length: A pair longer than max_seq_length loses the start of its prompt, down to this many tokens,
            before its answers lose their ends; null: half of max_seq_length.
    """

    destination_path: Path = Path("data/pairs")
    max_prompt_length: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        check_flag(self, "max_prompt_length", self.max_prompt_length is None
                   or 1 <= self.max_prompt_length < self.max_seq_length,
                   f"must be at least 1 and below --max_seq_length ({self.max_seq_length}): room for the answers")
        check_flag(self, "mask_inputs", self.mask_inputs, "DPO compares the answers: the loss is on their tokens "
                   "only, never the prompt's. Leave --mask_inputs out")


def main(args: PreferenceArgs) -> dict:
    if args.data_file is None:
        raise ValueError("preference.py needs --data_file: a JSON list or JSONL file of {prompt, chosen, rejected}")
    tokenizer = Tokenizer(args.checkpoint_dir)  # first: a missing model is said before the data are read
    pairs = load_preference_records(args.data_file)
    return prepare_pairs(pairs, args, tokenizer, source=args.data_file, source_sha256=file_sha256(args.data_file))


if __name__ == "__main__":
    cli(main, PreferenceArgs)
