import re

import pytest
import torch

from lit_lora.tokenizer import Tokenizer


def test_round_trip_and_special_tokens(tokenizer):
    text = "The model learns a low-rank matrix: 12 + 30 = 42."
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids.dtype == torch.long
    assert ids[0].item() == tokenizer.bos_id == 1 and ids[-1].item() == tokenizer.eos_id == 2
    assert tokenizer.bos_id not in ids[1:-1].tolist() and tokenizer.eos_id not in ids[1:-1].tolist()
    assert tokenizer.decode(ids) == text
    plain = tokenizer.encode(text, bos=False)
    assert torch.equal(plain, ids[1:-1])
    assert len(tokenizer.encode(text, max_length=5)) == 5


def test_byte_fallback_round_trips_unseen_characters(tokenizer):
    text = "Zürich ✓ 東京\n\n### Response:\n  two  spaces\tand a tab"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_train_writes_a_model_and_vocab_size(tmp_path, tokenizer):
    assert 260 < tokenizer.vocab_size <= 320
    assert len(tokenizer.checksum()) == 64
    other = Tokenizer.train(["one two three", "four five six"] * 20, vocab_size=300, model_prefix=tmp_path / "t")
    assert (tmp_path / "t.model").is_file() and other.checksum() != tokenizer.checksum()


def test_text_that_is_not_utf8_is_refused_with_the_character_and_its_place(tokenizer):
    # Python decodes a byte that is not UTF-8 (0xE9: é in Latin-1) from argv or input() to the lone surrogate
    # '\udce9'; SentencePiece cannot take it (pybind11's "Unable to cast Python instance of type <class 'str'>")
    with pytest.raises(ValueError, match=re.escape(
            "The text is not valid UTF-8: character 4 (after 'Caf') is the byte 0xE9, which is not UTF-8 on its own")):
        tokenizer.encode("Caf\udce9 au lait")
    with pytest.raises(ValueError, match=re.escape("character 1 (at the start) is U+D83D, half of a UTF-16")):
        tokenizer.encode("\ud83d")
