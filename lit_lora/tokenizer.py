"""Text <-> token ids, from either kind of tokenizer file the LLaMA family ships.

- `tokenizer.model`: a SentencePiece model (LLaMA 1 and 2, and the small tokenizers `Tokenizer.train` makes).
  One file holds everything: the pieces, BOS and EOS. Every text starts with BOS.
- `tokenizer.json`: a Hugging Face `tokenizers` pipeline (Llama 3.x, SmolLM2: byte-level BPE). Which token is
  BOS and which is EOS is written beside it, in tokenizer_config.json (`bos_token`, `eos_token`) and
  generation_config.json (`bos_token_id`, `eos_token_id`: a list where several ids end generation, as Llama 3
  Instruct's [<|end_of_text|>, <|eom_id|>, <|eot_id|>]). Whether a text starts with BOS is decided, as in
  transformers 5, by tokenizer.json's post-processor: Llama 3's puts <|begin_of_text|> first, SmolLM2's nothing.

`Tokenizer(path)` takes the file or its folder; a folder with both files is read through tokenizer.model. Either
way the same API: encode, decode, vocab_size, bos_id, eos_id, stop_ids, files, checksum.
"""

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import sentencepiece as spm
import torch

from lit_lora.files import atomic_write, read_json

# The files beside tokenizer.json that say which of its tokens are BOS, EOS and the ends of generation, and the
# model's chat template (transformers 5 writes it as chat_template.jinja; 4 inside tokenizer_config.json). Those a
# folder has are part of the tokenizer: a checkpoint folder carries them, and the checksum covers them.
TOKENIZER_JSON_COMPANIONS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                             "chat_template.jinja")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


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
    """A tokenizer read from tokenizer.model (SentencePiece) or tokenizer.json (Hugging Face `tokenizers`).

    Attributes:
        model_path: the file the vocabulary was read from, tokenizer.model or tokenizer.json.
        files: every file the tokenizer was read from, sorted by name: what a checkpoint folder must carry
            (`save_checkpoint_dir` copies them) and what `checksum` covers. SentencePiece: [tokenizer.model];
            tokenizer.json: tokenizer.json and those of TOKENIZER_JSON_COMPANIONS that its folder has.
        bos_id, eos_id, pad_id: the ids of BOS, EOS and padding, -1 where the tokenizer has none.
        add_bos: whether the model reads every text after BOS: `encode(text, bos=True)` adds it only then.
        stop_ids: every id that ends generation: EOS, then generation_config.json's other `eos_token_id`s.
        special_tokens: the text of BOS, EOS, padding and unknown (`bos_token`, ...), as a chat template reads them.
        chat_template: the model's own chat template (Jinja text), or None: chat_template.jinja beside the tokenizer
            file, else tokenizer_config.json's `chat_template` (lit_lora/prompts.py renders it).
        chat_template_file: the file the chat template was read from (what an error in the template names), or None.
    """

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in ("tokenizer.model", "tokenizer.json") if (path / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"No tokenizer in {path}: a checkpoint folder holds tokenizer.model (SentencePiece: LLaMA 1 and 2) "
                    "or tokenizer.json (Hugging Face: Llama 3, SmolLM2) beside lit_model.pth: see "
                    "howto/download_weights.md, or train one with Tokenizer.train(...)."
                )
            path = found[0]
        elif not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer at {path}. A checkpoint folder holds tokenizer.model or tokenizer.json beside "
                "lit_model.pth: see howto/download_weights.md, or train one with Tokenizer.train(...)."
            )
        self.model_path = path
        self.processor: Optional[spm.SentencePieceProcessor] = None  # set for tokenizer.model
        self.json_tokenizer = None  # a tokenizers.Tokenizer, set for tokenizer.json
        if path.suffix == ".json":
            self._read_tokenizer_json(path)
        else:
            try:
                self.processor = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as error:  # truncated, damaged, or not a SentencePiece model (sentencepiece's words)
                raise ValueError(f"{path} cannot be read as a SentencePiece tokenizer.model ({str(error).strip()[:200]}). "
                                 "It may be incomplete or damaged: download or convert it again.") from None
            self.files = [path] + [file for file in [path.parent / CHAT_TEMPLATE_FILE] if file.is_file()]
            self.special_tokens = {name: self.processor.id_to_piece(i) for name, i in (
                ("bos_token", self.processor.bos_id()), ("eos_token", self.processor.eos_id()),
                ("unk_token", self.processor.unk_id())) if i >= 0}
            self.bos_id = self.processor.bos_id()
            self.eos_id = self.processor.eos_id()
            self.pad_id = self.processor.pad_id()  # -1 for LLaMA: it has no padding token
            self.add_bos = self.bos_id >= 0  # LLaMA reads every text after <s>
            self.stop_ids = (self.eos_id,) if self.eos_id >= 0 else ()
        self.chat_template, self.chat_template_file = read_chat_template(path.parent)

    def _read_tokenizer_json(self, path: Path) -> None:
        """tokenizer.json, and BOS, EOS, padding and the stop ids from the files beside it."""
        JSONTokenizer = import_tokenizers(path)
        try:
            self.json_tokenizer = JSONTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"{path} cannot be read as a Hugging Face tokenizer.json ({error}). It may be incomplete "
                             "or from a newer `tokenizers`: download it again, or upgrade `tokenizers`.") from None
        folder = path.parent
        self.files = sorted([path] + [folder / name for name in TOKENIZER_JSON_COMPANIONS if (folder / name).is_file()],
                            key=lambda file: file.name)
        hint = "download the model's tokenizer files again"
        config = read_json(folder / "tokenizer_config.json", hint, missing_ok=True)
        special_tokens = read_json(folder / "special_tokens_map.json", hint, missing_ok=True)
        generation = read_json(folder / "generation_config.json", hint, missing_ok=True)

        self.special_tokens = {}

        def named_token(field: str) -> int:
            """The id of tokenizer_config.json's (else special_tokens_map.json's) `field`, or -1 if neither names one."""
            for file, fields in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens)):
                token = fields.get(field)
                if isinstance(token, dict):  # {"content": "<|begin_of_text|>", "lstrip": false, ...}
                    token = token.get("content")
                if token is None:
                    continue
                token_id = self.json_tokenizer.token_to_id(str(token))
                if token_id is None:
                    raise ValueError(f"{folder / file}: {field} {token!r} is not a token of {path}: the files come "
                                     "from different tokenizers. Download the model's tokenizer files together.")
                self.special_tokens[field] = str(token)
                return token_id
            return -1

        def generation_ids(field: str) -> list[int]:
            """generation_config.json's `field`: one id or a list of them (none if it is absent)."""
            value = generation.get(field)
            ids = [] if value is None else value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{folder / 'generation_config.json'}: {field} {value!r} is not an id of {path} "
                                 f"(0 to {self.vocab_size - 1}) or a list of them. Download the model's files together.")
            return ids

        self.bos_id = named_token("bos_token")
        if self.bos_id < 0:
            self.bos_id = (generation_ids("bos_token_id") or [-1])[0]
        end_ids = generation_ids("eos_token_id")
        self.eos_id = named_token("eos_token")
        if self.eos_id < 0:
            self.eos_id = (end_ids or [-1])[0]
        self.pad_id = named_token("pad_token")
        named_token("unk_token")
        self.stop_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *end_ids] if i >= 0))  # unique, EOS first
        # As transformers 5 (which ignores tokenizer_config.json's add_bos_token when there is a tokenizer.json):
        # BOS comes first if tokenizer.json's post-processor puts it there. encode() then adds it itself.
        with_special = self.json_tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.json_tokenizer.encode("a", add_special_tokens=False).ids
        self.add_bos = self.bos_id >= 0 and with_special[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    @property
    def vocab_size(self) -> int:
        """The number of ids the tokenizer can produce (tokenizer.json: with its added special tokens)."""
        if self.processor is not None:
            return self.processor.vocab_size()
        return self.json_tokenizer.get_vocab_size(with_added_tokens=True)

    def checksum(self) -> str:
        """A fingerprint of the tokenizer's files (sha256 of their bytes, in name order): prepared data records it,
        so finetuning can refuse data that was tokenized by another tokenizer."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.read_bytes())
        return digest.hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """The ids of `text`; with bos=True after BOS where the model reads texts so (`add_bos`: LLaMA 1-3 do,
        SmolLM2 does not), exactly as transformers' `tokenizer(text)` gives them; with eos=True followed by EOS.

        A special token's text (<|eot_id|> in a prompt) becomes its one id with tokenizer.json, as in transformers;
        SentencePiece reads it as ordinary text."""
        check_utf8(text)
        if self.processor is not None:
            ids = self.processor.encode(text)
        else:  # without the post-processor's special tokens: BOS and EOS are added here, once
            ids = self.json_tokenizer.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos:
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.model_path} has no EOS token to end a text with: give the tokenizer files "
                                 "that name one (tokenizer_config.json's eos_token)")
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def encode_with_offsets(self, text: str, bos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text`, as a chat template's text is read (transformers' apply_chat_template): the text of a
        special token (<|eot_id|>, and for SentencePiece <s> and </s>) is that token, and BOS comes first only where
        the text writes it (or `bos` and add_bos). With each token, the (start, end) of the characters it covers."""
        check_utf8(text)
        ids, offsets = ([self.bos_id], [(0, 0)]) if bos and self.add_bos else ([], [])
        if self.processor is None:
            encoding = self.json_tokenizer.encode(text, add_special_tokens=False)
            return ids + encoding.ids, offsets + [tuple(o) for o in encoding.offsets]
        specials = {piece: i for i, piece in ((self.bos_id, self.special_tokens.get("bos_token")),
                                              (self.eos_id, self.special_tokens.get("eos_token"))) if piece}
        pattern = "(" + "|".join(map(re.escape, specials)) + ")" if specials else None
        start = 0
        for part in re.split(pattern, text) if pattern else [text]:
            if part in specials:
                ids.append(specials[part])
                offsets.append((start, start + len(part)))
            elif part:
                pieces = sentencepiece_pieces(self.processor.encode(part, out_type="serialized_proto"))
                # begin/end are byte offsets into the UTF-8 text: turned into character offsets
                char_at = [i for i, ch in enumerate(part) for _ in ch.encode("utf-8")] + [len(part)]
                ids += [piece_id for piece_id, _, _ in pieces]
                offsets += [(start + char_at[begin], start + char_at[end]) for _, begin, end in pieces]
            start += len(part)
        return ids, offsets

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        """The text of `ids`, leaving out special tokens (BOS, EOS, <|eot_id|>), as SentencePiece does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.processor is not None:
            return self.processor.decode(list(ids))
        return self.json_tokenizer.decode(list(ids), skip_special_tokens=True)

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


def sentencepiece_pieces(serialized: bytes) -> list[tuple[int, int, int]]:
    """(id, begin, end) of each piece of SentencePiece's encoding, read from its serialized SentencePieceText proto
    (out_type="serialized_proto"): begin and end are the bytes of the UTF-8 text the piece was read from.

    The serialized proto is the one form of the offsets that every sentencepiece >= 0.2 returns: 0.2.0's
    out_type="immutable_proto" is refused by later releases ("immutable_proto is deprecated"), and their
    out_type="proto" needs the protobuf package. Its wire format is short to read: SentencePieceText's field 2 is a
    piece, whose fields 2, 4 and 5 are id, begin and end (sentencepiece.proto)."""
    return [(fields.get(2, 0), fields.get(4, 0), fields.get(5, 0))
            for number, piece in proto_fields(serialized) if number == 2
            for fields in [dict(proto_fields(piece))]]


def proto_fields(message: bytes) -> Iterable[tuple[int, Any]]:
    """(field number, value) of each field of a serialized protobuf message: an int for a varint, bytes otherwise."""

    def varint(i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            value, shift, i = value | (message[i] & 0x7F) << shift, shift + 7, i + 1
            if message[i - 1] < 0x80:
                return value, i

    i = 0
    while i < len(message):
        key, i = varint(i)
        wire_type = key & 7
        if wire_type == 0:
            value, i = varint(i)
        elif wire_type == 2:  # length-delimited: a string or a nested message
            length, i = varint(i)
            value, i = message[i:i + length], i + length
        else:  # fixed 64 (1) or 32 bits (5): a score
            size = {1: 8, 5: 4}[wire_type]
            value, i = message[i:i + size], i + size
        yield key >> 3, value


def import_tokenizers(path: Path) -> Any:
    """The `tokenizers` library's Tokenizer class, imported only when a tokenizer.json is read: it is an optional
    dependency, and SentencePiece models do not need it."""
    try:
        from tokenizers import Tokenizer as JSONTokenizer
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face tokenizer.json: reading it needs the `tokenizers` library. "
                          'Install it with `pip install -e ".[tokenizers]"`.') from None
    return JSONTokenizer


def read_chat_template(folder: Path) -> tuple[Optional[str], Optional[Path]]:
    """A model folder's chat template and the file it is in: chat_template.jinja (transformers 5), else
    tokenizer_config.json's `chat_template` (transformers 4: a string, or a list of {name, template} whose "default"
    is the chat template). (None, None) if neither has one."""
    jinja_file, config_file = folder / CHAT_TEMPLATE_FILE, folder / "tokenizer_config.json"
    if jinja_file.is_file():
        data = jinja_file.read_bytes()
        try:
            return data.decode("utf-8"), jinja_file
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise ValueError(f"{jinja_file}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8, and a chat "
                             "template is UTF-8 text: download the model's tokenizer files again, or re-encode the "
                             "file (iconv -f LATIN1 -t UTF-8)") from None
    hint = "download the model's tokenizer files again"
    template = read_json(config_file, hint, missing_ok=True).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return (template, config_file) if isinstance(template, str) else (None, None)
