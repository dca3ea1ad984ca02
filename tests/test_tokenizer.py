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


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json (Llama 3, SmolLM2): the same ids as transformers

HARD_STRINGS = [
    "Hello world", " a leading space", "trailing space ", "  two  spaces,\ta tab", "\n", "\n\nnewlines\n\n\n",
    "windows\r\nline ends\r\n", "digits 1234567890, 3.14159 and -42", "don't, you'll, WE'RE", "", " ", "   ",
    "Zürich ✓ 東京 😀👍🏽 e\u0301 \ufb01 \uff21 a\u200bb", "### Instruction:\nAdd 12 and 30.\n\n### Response:\n42",
]
SPECIAL_STRINGS = ["<|eot_id|>", "an answer<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
                   "<|im_start|>user\nHi<|im_end|>\n", "a<|begin_of_text|>b"]


@pytest.mark.parametrize("family", ["llama3", "smollm2"])
def test_tokenizer_json_gives_the_ids_of_transformers(family, llama3_tokenizer_dir, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    folder = {"llama3": llama3_tokenizer_dir, "smollm2": smollm2_tokenizer_dir}[family]
    ours, theirs = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs) == 600 + (5 if family == "llama3" else 0)
    assert ours.add_bos == (family == "llama3")  # Llama 3 reads every text after <|begin_of_text|>, SmolLM2 not
    for text in HARD_STRINGS + SPECIAL_STRINGS:
        ids = ours.encode(text, bos=True)
        assert ids.tolist() == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True), text
    for text in HARD_STRINGS:
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text  # special tokens are left out
    assert [ours.encode(t).tolist() for t in HARD_STRINGS] == theirs(HARD_STRINGS)["input_ids"]  # a batch


def test_llama3_style_bos_eos_and_stop_ids(llama3_tokenizer_dir, tmp_path):
    from tests.conftest import make_tokenizer_json_dir

    tokenizer = Tokenizer(llama3_tokenizer_dir)
    ids = {name: tokenizer.json_tokenizer.token_to_id(name) for name in
           ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    assert (tokenizer.bos_id, tokenizer.eos_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"])  # Instruct: EOS <|eot_id|>
    assert tokenizer.stop_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])  # EOS first, then generation_config's
    text = tokenizer.encode("Hi there", bos=True, eos=True).tolist()
    assert text[0] == tokenizer.bos_id and text[-1] == tokenizer.eos_id and text.count(tokenizer.bos_id) == 1
    assert tokenizer.encode("Hi there", bos=False).tolist() == text[1:-1]
    assert tokenizer.encode("<|eot_id|>", bos=False).tolist() == [ids["<|eot_id|>"]]  # a special token's text: its id
    assert [f.name for f in tokenizer.files] == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]

    base = Tokenizer(make_tokenizer_json_dir(tmp_path / "base", "llama3", instruct=False))
    assert base.eos_id == ids["<|end_of_text|>"] and base.stop_ids == (base.eos_id,)


def test_smollm2_style_puts_no_bos_before_a_text(smollm2_tokenizer_dir, tmp_path):
    from tests.conftest import make_tokenizer_json_dir

    tokenizer = Tokenizer(smollm2_tokenizer_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids) == (1, 2, (2,))  # <|im_start|>, <|im_end|>
    assert tokenizer.encode("Hi", bos=True).tolist() == tokenizer.encode("Hi", bos=False).tolist()
    assert tokenizer.encode("Hi", bos=True, eos=True).tolist()[-1] == 2
    base = Tokenizer(make_tokenizer_json_dir(tmp_path / "base", "smollm2", instruct=False))
    assert (base.bos_id, base.eos_id, base.stop_ids) == (0, 0, (0,))  # <|endoftext|>


def test_checksum_covers_every_file_of_the_tokenizer(llama3_tokenizer_dir, tokenizer, tmp_path):
    import hashlib
    import shutil

    assert tokenizer.checksum() == hashlib.sha256(tokenizer.model_path.read_bytes()).hexdigest()  # as before
    folder = shutil.copytree(llama3_tokenizer_dir, tmp_path / "copy")
    before = Tokenizer(folder).checksum()
    assert before == hashlib.sha256(b"".join(f.read_bytes() for f in Tokenizer(folder).files)).hexdigest()
    (folder / "generation_config.json").write_text('{"eos_token_id": 1}')
    assert Tokenizer(folder).checksum() != before


def test_which_file_a_folder_is_read_from(llama3_tokenizer_dir, tokenizer_path, tmp_path):
    import shutil

    both = shutil.copytree(llama3_tokenizer_dir, tmp_path / "both")
    shutil.copyfile(tokenizer_path, both / "tokenizer.model")
    assert Tokenizer(both).model_path.name == "tokenizer.model" and Tokenizer(both).files == [both / "tokenizer.model"]
    assert Tokenizer(both / "tokenizer.json").model_path.name == "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="No tokenizer in .*tokenizer.model .* or tokenizer.json"):
        Tokenizer(tmp_path)


def test_bad_tokenizer_json_files_are_named(llama3_tokenizer_dir, tmp_path, monkeypatch):
    import json
    import shutil
    import sys

    folder = shutil.copytree(llama3_tokenizer_dir, tmp_path / "bad")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token '<s>' is not a token of .*tokenizer.json"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not valid JSON"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id \[1, 99999\] is not an id of"):
        Tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ValueError, match="cannot be read as a Hugging Face tokenizer.json"):
        Tokenizer(folder)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=re.escape('needs the `tokenizers` library. Install it with `pip install -e ".[tokenizers]"`')):
        Tokenizer(folder)


def test_a_checkpoint_folder_carries_the_tokenizer_json_files(llama3_tokenizer_dir, tmp_path):
    from lit_lora.checkpoint import (
        check_checkpoint_dir,
        load_model,
        save_checkpoint_dir,
    )
    from tests.conftest import make_checkpoint

    folder = make_checkpoint(tmp_path / "checkpoint", llama3_tokenizer_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["checksums.json", "generation_config.json", "lit_model.pth",
                                                        "model_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert Tokenizer(folder).checksum() == Tokenizer(llama3_tokenizer_dir).checksum()
    assert load_model(folder).config.vocab_size == 605
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.model or tokenizer.json"):
        check_checkpoint_dir(folder)
    with pytest.raises(TypeError, match=r"a list of tokenizer files, not the one path .*pass Tokenizer\(path\).files"):
        save_checkpoint_dir(tmp_path / "other", {}, None, llama3_tokenizer_dir / "tokenizer.json")
