"""A tokenizer in GGUF metadata, both ways: the files our Tokenizer reads, written from a GGUF file's tokenizer.ggml.*
keys (tokenizer_files_from_gguf), and those keys written from our Tokenizer (add_tokenizer_metadata).

llama.cpp knows two kinds for the llama architecture: `gpt2`, a byte-level BPE (Llama 3, SmolLM2: tokens spelled
in GPT-2's byte alphabet, merges, and the name of the pre-tokenizer that splits text before the merges), and
`llama`, SentencePiece (LLaMA 1 and 2: tokens with scores). Token types are SentencePiece's numbering: 1 normal,
2 unknown, 3 control (special tokens), 4 user-defined, 5 unused, 6 byte.
"""

import json
import math
from pathlib import Path

from lit_lora.convert.gguf_file import import_for_gguf
from lit_lora.model import Config
from lit_lora.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer

# The pre-tokenizers (tokenizer.ggml.pre) whose byte-level BPE splits text with Llama 3's regex; the others split
# it as GPT-2 does. llama.cpp needs the name to read the file back.
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_TYPES = (1, 2, 3, 4, 5, 6)  # the module docstring's; SentencePiece's model has no other


def tokenizer_files_from_gguf(file, folder: Path) -> list[Path]:
    """Write the files our Tokenizer reads from the file's tokenizer metadata into `folder`: tokenizer.json with
    tokenizer_config.json and generation_config.json (a byte-level BPE, `gpt2`), or tokenizer.model (SentencePiece,
    `llama`); and chat_template.jinja where the file has a chat template. Returns their paths. The metadata is
    checked first (read_vocabulary): an error names its key and the GGUF file, never a file written here."""
    model = file.get("tokenizer.ggml.model", kind=str)
    if model not in ("gpt2", "llama"):
        raise ValueError(f"{file.path}: tokenizer.ggml.model is {model!r}: lit-lora reads the llama (SentencePiece) "
                         "and gpt2 (byte-level BPE) tokenizers only")
    tokens, types, special = read_vocabulary(file)
    template = file.get("tokenizer.chat_template", None, kind=str)
    if model == "gpt2":
        files = byte_level_bpe_files(file, tokens, types, special, folder)
    else:
        files = [sentencepiece_model_file(file, tokens, types, special, folder)]
    if template is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        files.append(folder / CHAT_TEMPLATE_FILE)
    return files


# The special tokens a file may name by id; bos and eos are llama.cpp's, eot and eom end a turn (Llama 3)
SPECIAL_TOKENS = ("bos", "eos", "unknown", "padding", "eot", "eom")


def read_vocabulary(file) -> tuple[list[str], list[int], dict]:
    """The tokens (text, each once), their types (one per token, 1 to 6) and the special tokens' ids (each that of a
    token, or None where the file names none), checked; an error naming the key otherwise."""
    tokens = file.get("tokenizer.ggml.tokens", kind=str, array=True)
    if not tokens:
        raise file.error("tokenizer.ggml.tokens", "is empty")
    first_id = {}
    for i, token in enumerate(tokens):
        if first_id.setdefault(token, i) != i:
            raise file.error("tokenizer.ggml.tokens", f"holds {token!r} twice (ids {first_id[token]} and {i}), and "
                                                      "a vocabulary's tokens are unique")
    types = file.get("tokenizer.ggml.token_type", None, kind=int, array=True)
    types = [1] * len(tokens) if types is None else types
    if len(types) != len(tokens):
        raise file.error("tokenizer.ggml.token_type", f"holds {len(types):,} types for {len(tokens):,} tokens")
    unknown = next((i for i, kind in enumerate(types) if kind not in TOKEN_TYPES), None)
    if unknown is not None:
        raise file.error("tokenizer.ggml.token_type", f"gives token {unknown} the type {types[unknown]}, which is "
                                                      f"none of {', '.join(map(str, TOKEN_TYPES))}")
    special = {name: file.get(f"tokenizer.ggml.{name}_token_id", None, kind=int) for name in SPECIAL_TOKENS}
    for name, token_id in special.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise file.error(f"tokenizer.ggml.{name}_token_id", f"is {token_id}, not the id of a token (0 to "
                                                                f"{len(tokens) - 1}, tokenizer.ggml.tokens)")
    return tokens, types, special


def read_merges(file, tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges, each two tokens, separated by a space, whose concatenation is a token too."""
    vocabulary, merges = set(tokens), []
    for i, merge in enumerate(file.get("tokenizer.ggml.merges", kind=str, array=True)):
        pair = tuple(merge.split(" ", 1))
        if len(pair) != 2 or not all(pair):
            raise file.error("tokenizer.ggml.merges", f"holds {merge!r} (merge {i}), not two tokens and a space")
        if not {pair[0], pair[1], pair[0] + pair[1]} <= vocabulary:
            raise file.error("tokenizer.ggml.merges", f"holds {merge!r} (merge {i}), which merges or makes a token "
                                                      "that tokenizer.ggml.tokens lacks")
        merges.append(pair)
    return merges


def byte_level_bpe_files(file, tokens: list[str], types: list[int], special: dict, folder: Path) -> list[Path]:
    """A byte-level BPE as `tokenizers` runs it: the vocabulary in id order, the merges, the control tokens (type 3)
    as special tokens and the user-defined ones (4) as added tokens, the pre-tokenizer the file names, BOS first
    where tokenizer.ggml.add_bos_token says so; and which tokens are BOS, EOS and the ends of generation."""
    import_for_gguf("tokenizers", f"Reading the byte-level BPE tokenizer of {file.path}")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as JSONTokenizer

    merges = read_merges(file, tokens)
    pre = file.get("tokenizer.ggml.pre", "default", kind=str)
    add_bos = file.get("tokenizer.ggml.add_bos_token", False, kind=bool)
    tokenizer = JSONTokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    if pre in LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                            use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                                  if k == 3])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])
    bos = special["bos"]
    if add_bos and bos is not None:
        try:  # the template as a list: a token with a space in it stays one token
            bos_first = processors.TemplateProcessing(single=[tokens[bos], "$A"], special_tokens=[(tokens[bos], bos)])
        except ValueError as error:
            raise file.error("tokenizer.ggml.bos_token_id", f"is that of {tokens[bos]!r}, which the tokenizers "
                                                            f"library cannot put before a text ({error})") from None
        tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos_first])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    config = {names[name]: tokens[special[name]] for name in names if special[name] is not None}
    config.update(tokenizer_class="PreTrainedTokenizerFast",
                  model_max_length=file.get("llama.context_length", 2048, kind=int))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    ends = [i for i in (special["eos"], special["eot"], special["eom"]) if i is not None]
    generation = {"bos_token_id": bos, "eos_token_id": list(dict.fromkeys(ends)) or None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return [folder / name for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")]


def sentencepiece_model_file(file, tokens: list[str], types: list[int], special: dict, folder: Path) -> Path:
    """A SentencePiece model (tokenizer.model) of the file's pieces, scores and types (llama.cpp's token types are
    SentencePiece's), BPE as LLaMA's, with a space before the text unless tokenizer.ggml.add_space_prefix says not."""
    model_pb2 = import_for_gguf("sentencepiece.sentencepiece_model_pb2",
                                f"Reading the SentencePiece tokenizer of {file.path}")
    scores = file.get("tokenizer.ggml.scores", [0.0] * len(tokens), kind=float, array=True)
    if len(scores) != len(tokens) or any(math.isnan(score) for score in scores):
        raise file.error("tokenizer.ggml.scores", f"holds {len(scores):,} scores for {len(tokens):,} tokens"
                         if len(scores) != len(tokens) else "holds NaN, not a score")
    proto = model_pb2.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = 6 in types  # BYTE tokens <0x00> ... <0xFF>
    proto.trainer_spec.unk_id = special["unknown"] if special["unknown"] is not None else 0
    proto.trainer_spec.bos_id = special["bos"] if special["bos"] is not None else -1
    proto.trainer_spec.eos_id = special["eos"] if special["eos"] is not None else -1
    proto.trainer_spec.pad_id = special["padding"] if special["padding"] is not None else -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = file.get("tokenizer.ggml.add_space_prefix", True, kind=bool)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return folder / "tokenizer.model"


def add_tokenizer_metadata(writer, tokenizer: Tokenizer, config: Config) -> None:
    """The tokenizer as llama.cpp reads it: its model (gpt2: byte-level BPE; llama: SentencePiece), tokens in id order
    (padded to the model's vocabulary with unused ones), their types, the merges or scores, the special ids, whether a
    text starts with BOS, and the chat template."""
    n = config.padded_vocab_size
    if tokenizer.processor is not None:  # SentencePiece
        sp = tokenizer.processor
        tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
                 else 1 for i in range(len(tokens))]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))] + [-1000.0] * (n - len(tokens)))
        writer.add_add_space_prefix(sentencepiece_adds_a_space(sp))
    else:  # tokenizer.json: a byte-level BPE
        vocab = tokenizer.json_tokenizer.get_vocab(with_added_tokens=True)
        tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        added = {token.content: token.special for token in tokenizer.json_tokenizer.get_added_tokens_decoder().values()}
        types = [(3 if added[token] else 4) if token in added else 1 for token in tokens]
        model = json.loads(tokenizer.model_path.read_text(encoding="utf-8"))["model"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, config))
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])])
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), n)])
    writer.add_token_types(types + [5] * (n - len(tokens)))  # 5: UNUSED
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id >= 0:
            add(token_id)
    ends = [i for i in tokenizer.stop_ids if i != tokenizer.eos_id]
    if ends:
        writer.add_eot_token_id(ends[-1])  # Llama 3 Instruct: <|eot_id|>, where llama.cpp ends a turn
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def sentencepiece_adds_a_space(processor) -> bool:
    """Whether SentencePiece puts "▁" (a space) before a text, as LLaMA's does: its normalizer's add_dummy_prefix."""
    model_pb2 = import_for_gguf("sentencepiece.sentencepiece_model_pb2", "Writing a SentencePiece tokenizer to GGUF")
    proto = model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    return proto.normalizer_spec.add_dummy_prefix  # true unless the model says otherwise


def pre_tokenizer_name(tokenizer: Tokenizer, config: Config) -> str:
    """The name llama.cpp knows this byte-level BPE's pre-tokenizer by: the one the model came with from a GGUF file,
    else llama-bpe for Llama 3's regex, smollm for SmolLM2, default (GPT-2's) otherwise."""
    recorded = config.extra.get("gguf", {}).get("pre")
    if recorded:
        return recorded
    pre_tokenizer = json.dumps(json.loads(tokenizer.model_path.read_text(encoding="utf-8")).get("pre_tokenizer"))
    if json.dumps(LLAMA3_SPLIT)[1:-1] in pre_tokenizer:  # its Split holds Llama 3's regex
        return "llama-bpe"
    return "smollm" if "smollm" in (config.name + str(config.extra.get("hf_model", ""))).lower() else "default"
