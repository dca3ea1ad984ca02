"""See what the model will learn from one prepared example: the tokens that carry loss are marked.

    python prepare_data/inspect_data.py --data_dir data/alpaca --index 3

A preference pair (prepare_data/preference.py) is shown as its chosen, then its rejected answer after the prompt.
With mask_inputs (the default), only the response and its EOS (or the prompt style's end of response, such as
<|eot_id|>) carry loss: the model learns to answer, not to predict the prompt. Loss tokens are shown [[like this]] (and in green on a terminal).
"""

import sys
from pathlib import Path
from typing import Literal, Optional

from lit_lora.cli import cli
from lit_lora.data import IGNORE_INDEX, load_prepared, read_prepare_config
from lit_lora.preference import load_pairs
from lit_lora.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text. SentencePiece: '▁' is a space, byte tokens like <0x0A> are their character, BOS/EOS are
    <s> and </s>. tokenizer.json: a special token is its own text (<|eot_id|>), any other token is decoded alone
    (a byte-level token that holds part of a character shows as '\ufffd')."""
    if tokenizer.processor is None:
        return tokenizer.json_tokenizer.decode([token_id], skip_special_tokens=False)
    sp = tokenizer.processor
    if token_id == tokenizer.bos_id:
        return "<s>"
    if token_id == tokenizer.eos_id:
        return "</s>"
    if sp.is_byte(token_id):
        return chr(int(sp.id_to_piece(token_id)[3:-1], 16))  # '<0x0A>' -> '\n' (ASCII bytes; others as '\ufffd')
    return sp.id_to_piece(token_id).replace("\u2581", " ")


def render(tokenizer: Tokenizer, input_ids, labels, color: bool = False) -> str:
    """The example's text with every run of loss-carrying tokens wrapped in [[ ]] (or coloured)."""
    start, end = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    pieces, inside = [], False
    for position, (token_id, label) in enumerate(zip(input_ids.tolist(), labels.tolist())):
        carries_loss = label != IGNORE_INDEX
        if carries_loss != inside:
            pieces.append(start if carries_loss else end)
            inside = carries_loss
        text = token_text(tokenizer, token_id)
        if position == 1 and input_ids[0] == tokenizer.bos_id and tokenizer.processor is not None:
            text = text.removeprefix(" ")  # SentencePiece's space before the first word is not in the text
        pieces.append(text)
    if inside:
        pieces.append(end)
    return "".join(pieces)


def main(data_dir: Path = Path("data/alpaca"), index: int = 0, split: Literal["train", "test"] = "train",
         checkpoint_dir: Optional[Path] = None) -> str:
    """Print one prepared example with its loss tokens marked.

    Args:
        data_dir: A folder made by a prepare_data/ script.
        index: Which example.
        split: train or test.
        checkpoint_dir: The model folder whose tokenizer made the data (default: the one recorded at preparation).
    """
    pairs = (data_dir / "prepare_config.json").is_file() and read_prepare_config(data_dir).get("kind") == "preference"
    train, test, config = load_pairs(data_dir) if pairs else load_prepared(data_dir)
    tokenizer = Tokenizer(checkpoint_dir or config["checkpoint_dir"])
    examples = train if split == "train" else test
    kind = "preference pairs" if pairs else "examples"
    if not 0 <= index < len(examples):
        raise IndexError(f"--index {index} is out of range: {data_dir} has {len(examples)} {split} {kind}")
    shown = [("chosen", examples[index]["chosen"]), ("rejected", examples[index]["rejected"])] if pairs \
        else [("example", examples[index])]
    texts = []
    for name, example in shown:  # a pair: the same prompt, then each answer
        labels = example["labels"].clone()
        labels[0] = IGNORE_INDEX  # the first token is never predicted (nothing comes before it)
        n_loss = int((labels != IGNORE_INDEX).sum())
        texts.append(render(tokenizer, example["input_ids"], labels, color=sys.stdout.isatty()))
        print(f"{split} {name} {index} of {data_dir}: {len(example['input_ids'])} tokens, {n_loss} carry loss "
              f"(marked {'in green' if sys.stdout.isatty() else '[[like this]]'})\n")
        print(texts[-1] + ("\n" if pairs else ""))
    return "\n".join(texts)


if __name__ == "__main__":
    cli(main)
