"""Text <-> token ids with a SentencePiece model (LLaMA's `tokenizer.model`)."""

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Union

import sentencepiece as spm
import torch

from lit_lora.utils import atomic_write


def check_utf8(text: str, what: str = "The text") -> None:
    """Refuse a str that has no UTF-8 form, naming the first bad character and where it is.

    SentencePiece reads UTF-8. Python turns each byte that is not UTF-8 in a command-line argument (and, on a
    terminal that is not set to UTF-8, in input()) into a lone surrogate: the byte 0xE9 (é in Latin-1) becomes
    '\\udce9'. Such a str cannot be encoded, and SentencePiece would fail with pybind11's "Unable to cast Python
    instance of type <class 'str'> to C++ type", which says nothing about the text.
    """
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError as error:
        position = error.start
    code = ord(text[position])
    if 0xDC80 <= code <= 0xDCFF:  # Python's stand-in for the undecodable byte code - 0xDC00 ("surrogateescape")
        character = f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8 on its own"
    else:
        character = f"U+{code:04X}, half of a UTF-16 surrogate pair, which UTF-8 cannot encode"
    where = f"after {text[max(0, position - 20):position]!r}" if position else "at the start"
    raise ValueError(
        f"{what} is not valid UTF-8: character {position + 1} ({where}) is {character}. Give the text in UTF-8: "
        "type it in a terminal set to UTF-8, or convert its file, e.g. with `iconv -f latin1 -t utf-8`."
    )


class Tokenizer:
    def __init__(self, model_path: Union[str, Path]):
        model_path = Path(model_path)
        if model_path.is_dir():
            model_path = model_path / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(
                f"No tokenizer at {model_path}. A checkpoint folder holds tokenizer.model beside lit_model.pth: "
                "see howto/download_weights.md, or train one with Tokenizer.train(...)."
            )
        self.model_path = model_path
        self.processor = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()  # -1 for LLaMA: it has no padding token

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def checksum(self) -> str:
        """A fingerprint of the tokenizer file: prepared data records it, so finetuning can refuse
        data that was tokenized by another tokenizer."""
        return hashlib.sha256(self.model_path.read_bytes()).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        check_utf8(text)
        ids = self.processor.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(list(ids))

    @staticmethod
    def train(texts_or_file: Union[str, Path, Iterable[str]], vocab_size: int, model_prefix: Union[str, Path]) -> "Tokenizer":
        """Train a small LLaMA-style tokenizer (BPE, byte fallback, unk=0 bos=1 eos=2, no pad) and load it.

        `texts_or_file` is a text file (one sentence per line) or an iterable of strings. Writes
        `<model_prefix>.model`, whole or not at all. With byte fallback every string round-trips, even one
        with characters never seen in training; `vocab_size` must leave room for the 256 byte tokens.
        """
        model_prefix = Path(model_prefix)
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(texts_or_file, (str, Path)):
            texts = Path(texts_or_file).read_text(encoding="utf-8").splitlines()
        else:
            # Train on lines, as LLaMA's tokenizer was: no piece spans a newline, which is encoded as the
            # byte token <0x0A> (so "\nk" never becomes one token that hides the letter k)
            texts = [line for text in texts_or_file for line in text.split("\n")]
        model = io.BytesIO()  # the trainer writes the model here, not to files
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            hard_vocab_limit=False,  # a small corpus may not fill vocab_size; that is fine
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True,  # one token per digit, as LLaMA's tokenizer does
            normalization_rule_name="identity",  # keep the text as it is: newlines, double spaces
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        atomic_write(Path(f"{model_prefix}.model"), lambda tmp: Path(tmp).write_bytes(model.getvalue()))
        return Tokenizer(str(model_prefix) + ".model")
