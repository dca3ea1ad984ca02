"""LLaMA's SentencePiece tokenizer as Hugging Face tokenizer files: tokenizer.json, tokenizer_config.json and
special_tokens_map.json, written by the export to Hugging Face (lit_lora/convert/hf.py).

transformers builds a tokenizer from tokenizer.json (the `tokenizers` library's format) and tokenizer_config.json.
Given only tokenizer.model it needs protobuf to convert it, and without tokenizer_config.json it does not know that
LLaMA starts every text with BOS. So the export writes both, built here as plain JSON from the SentencePiece model:
its pieces become the BPE vocabulary (same ids), and the merge rules are derived from the pieces' scores
(sentencepiece_merges), so that `AutoTokenizer.from_pretrained` gives the ids that `Tokenizer.encode` gives.
"""

import sys

from lit_lora.tokenizer import Tokenizer

SPACE = "▁"  # U+2581: SentencePiece writes each space as this character, and puts one before the text

# What SentencePiece's normalizer may change: spaces at both ends and doubled, a tab, a newline, and characters that
# Unicode NFKC normalization rewrites (the ligature "ﬁ", the full-width "Ａ"). LLaMA's tokenizer keeps them all.
NORMALIZATION_PROBE = "  two  spaces,\ta tab,\na newline, \ufb01 \uff21 "


def sentencepiece_merges(tokenizer: Tokenizer) -> list[list[str]]:
    """The merge rules of a Hugging Face BPE model that splits text as this SentencePiece BPE model does.

    SentencePiece starts from single characters and repeatedly joins the adjacent pair that makes the piece with
    the highest score. Hugging Face's BPE starts the same way and repeatedly applies, among the adjacent pairs, the
    merge rule (left, right) that comes first in its list. So: one rule for every way of cutting a piece into two
    pieces, listed in the order of the score of the piece they make, best first (as transformers' converter does).
    Only ordinary pieces take part: control (<s>), unknown and byte (<0x0A>) pieces are never made by a merge.
    (A tokenizer with user-defined pieces, which SentencePiece matches whole before merging, is not reproduced;
    LLaMA's has none.)
    """
    processor = tokenizer.processor
    ordinary = {}  # piece -> id
    for piece_id in range(processor.get_piece_size()):
        if not (processor.is_control(piece_id) or processor.is_unknown(piece_id) or processor.is_byte(piece_id)
                or processor.is_unused(piece_id)):
            ordinary[processor.id_to_piece(piece_id)] = piece_id
    rules = []  # (rank, [left, right])
    for piece, piece_id in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                rank = (-processor.get_score(piece_id), piece_id, ordinary[left], ordinary[right])  # ties: by id
                rules.append((rank, [left, right]))
    rules.sort(key=lambda rule: rule[0])
    return [pair for _, pair in rules]


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (file name -> content) for a LLaMA-style
    SentencePiece BPE tokenizer, so that `AutoTokenizer.from_pretrained` gives the ids `tokenizer.encode` gives.

    The pipeline of tokenizer.json, in the order it runs:
      normalizer      one "▁" before the text (SentencePiece's dummy prefix), then each space -> "▁"
      pre_tokenizer   none: the text stays one piece, as SentencePiece merges across spaces too
      model           BPE over SentencePiece's pieces (same ids) with the merges above; byte_fallback writes a
                      character outside the vocabulary as its UTF-8 bytes (<0xE2><0x82><0xAC>), as SentencePiece does
      post_processor  BOS before the text
      decoder         "▁" -> space, byte tokens -> characters, then drop the space of the dummy prefix

    Why a normalizer and not the Metaspace pre-tokenizer of newer Llama files: Metaspace adds no "▁" before a text
    that starts with a space, so " Hello" would lose a space that SentencePiece keeps. For the same reason
    tokenizer_config.json names the generic PreTrainedTokenizerFast, which runs tokenizer.json as it is: transformers'
    LlamaTokenizer class replaces the pipeline with its own Metaspace one.
    """
    processor = tokenizer.processor
    pieces = [processor.id_to_piece(piece_id) for piece_id in range(processor.get_piece_size())]
    special_ids = [piece_id for piece_id in range(len(pieces))
                   if processor.is_control(piece_id) or processor.is_unknown(piece_id)]
    if tokenizer.bos_id < 0:
        raise ValueError(f"{tokenizer.model_path} has no BOS token, which lit-lora puts before every text: "
                         "it is not the tokenizer of a lit-lora model")
    bos_piece, unk_piece = pieces[tokenizer.bos_id], pieces[processor.unk_id()]
    eos_piece = pieces[tokenizer.eos_id] if tokenizer.eos_id >= 0 else None

    dummy_prefix = processor.normalize("a").startswith(SPACE)
    normalized = processor.normalize(NORMALIZATION_PROBE)
    if normalized != (SPACE if dummy_prefix else "") + NORMALIZATION_PROBE.replace(" ", SPACE):
        print(f"Warning: {tokenizer.model_path} changes text before splitting it ({NORMALIZATION_PROBE!r} becomes "
              f"{normalized!r}); tokenizer.json does not, so transformers will give other ids than lit-lora for "
              "such text (LLaMA's tokenizers and those of Tokenizer.train keep text as it is).", file=sys.stderr)

    def added_token(piece_id: int) -> dict:  # a special token: matched whole in the text, never split or normalized
        return {"id": piece_id, "content": pieces[piece_id], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    bos_first = {  # "$A" is the text; "pair" is for two texts at once (transformers asks for it)
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos_piece, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_piece: {"id": bos_piece, "ids": [tokenizer.bos_id], "tokens": [bos_piece]}},
    }
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy_prefix:  # LLaMA's: "Hello" is encoded as "▁Hello", like the "world" of "Hello world"
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(piece_id) for piece_id in special_ids],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": bos_first,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk_piece, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: piece_id for piece_id, piece in enumerate(pieces)},
                  "merges": sentencepiece_merges(tokenizer)},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is (see above)
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos_piece,
        "eos_token": eos_piece,
        "unk_token": unk_piece,
        "pad_token": None,
        "added_tokens_decoder": {str(piece_id): {field: value for field, value in added_token(piece_id).items()
                                                 if field != "id"} for piece_id in special_ids},
        "clean_up_tokenization_spaces": False,  # else decoding turns "a ." into "a."
        "model_max_length": model_max_length,
    }
    special_tokens_map = {name: {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}
                          for name, piece in (("bos_token", bos_piece), ("eos_token", eos_piece),
                                              ("unk_token", unk_piece)) if piece}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_tokens_map}
