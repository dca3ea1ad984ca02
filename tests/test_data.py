import hashlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import lit_lora.files
from lit_lora.data import (
    IGNORE_INDEX,
    PrepareArgs,
    collate,
    load_prepared,
    prepare,
    tokenize_example,
)
from lit_lora.data_files import download, load_records
from lit_lora.prompts import format_prompt
from lit_lora.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "gsm8k-alpaca.json"

RECORDS = [
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Say hello.", "output": "Hello!"},
] * 4


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_template_with_and_without_input():
    with_input = format_prompt("Add the numbers.", "12 and 30")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n12 and 30\n\n### Response:\n")
    assert "paired with an input" in with_input
    without = format_prompt("Say hello.")
    assert without.endswith("### Instruction:\nSay hello.\n\n### Response:\n")
    assert "### Input" not in without and "paired with an input" not in without


@pytest.mark.parametrize("record", RECORDS[:2])
def test_masking_puts_ignore_index_exactly_on_the_prompt(tokenizer, record):
    example = tokenize_example(record, tokenizer, max_seq_length=256)
    prompt = format_prompt(record["instruction"], record["input"])
    prompt_length = len(tokenizer.encode(prompt, bos=True))
    assert torch.equal(example["input_ids"], tokenizer.encode(prompt + record["output"], bos=True, eos=True))
    assert (example["labels"][:prompt_length] == IGNORE_INDEX).all()
    assert torch.equal(example["labels"][prompt_length:], example["input_ids"][prompt_length:])
    assert tokenizer.decode(example["labels"][prompt_length:]) == record["output"]  # exactly the response
    unmasked = tokenize_example(record, tokenizer, max_seq_length=256, mask_inputs=False)
    assert torch.equal(unmasked["labels"], unmasked["input_ids"])


def test_a_cut_response_ends_without_eos_and_a_whole_one_with_it(tokenizer):
    record = {"instruction": "Say hello.", "input": "", "output": "hello " * 50}
    prompt = format_prompt("Say hello.")
    prompt_length = len(tokenizer.encode(prompt, bos=True))
    whole = tokenizer.encode(prompt + record["output"], bos=True, eos=True)

    cut = tokenize_example(record, tokenizer, max_seq_length=prompt_length + 5)
    assert cut["truncated"] and torch.equal(cut["input_ids"], whole[: prompt_length + 5])
    assert tokenizer.eos_id not in cut["input_ids"].tolist()  # no EOS after a cut response: it would teach to stop
    assert torch.equal(cut["labels"][prompt_length:], whole[prompt_length : prompt_length + 5])  # 5 response tokens
    assert cut["input_ids"].untyped_storage().nbytes() == (prompt_length + 5) * 8  # saved alone, not the whole

    fits = tokenize_example(record, tokenizer, max_seq_length=len(whole))  # exactly fits: whole, with EOS
    assert not fits["truncated"] and torch.equal(fits["input_ids"], whole)
    one_short = tokenize_example(record, tokenizer, max_seq_length=len(whole) - 1)  # the response fits, EOS not
    assert one_short["truncated"] and tokenizer.eos_id not in one_short["input_ids"].tolist()

    # room for one response token is enough; a prompt that fills max_seq_length leaves nothing to learn
    one_token = tokenize_example(record, tokenizer, max_seq_length=prompt_length + 1)
    assert one_token["input_ids"].shape == (prompt_length + 1,)
    assert tokenize_example(record, tokenizer, max_seq_length=prompt_length) is None


def test_prepare_writes_splits_settings_and_counts(tmp_path, tokenizer, capsys):
    long = {"instruction": "word " * 200, "input": "", "output": "x"}  # the prompt alone is too long: dropped
    summary = prepare(RECORDS + [long], tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=3)
    train, test, config = load_prepared(tmp_path / "data", tokenizer)
    assert len(train) + len(test) == 12 and summary["dropped"] == 1
    assert config["tokenizer_checksum"] == tokenizer.checksum() and config["max_seq_length"] == 256
    assert config["test_split_size"] == 3 and summary == config
    assert 0 < config["loss_token_share"] < 0.5
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepare_config.json", "test.pt", "train.pt"]
    out = capsys.readouterr().out
    assert "1 dropped" in out and "p95" in out and "carry loss" in out and "EOS kept" not in out
    # a fraction, and the same seed gives the same split
    prepare(RECORDS, tokenizer, tmp_path / "again", max_seq_length=256, test_split_size=0.25, seed=7)
    prepare(RECORDS, tokenizer, tmp_path / "again2", max_seq_length=256, test_split_size=0.25, seed=7)
    a, b = load_prepared(tmp_path / "again")[1], load_prepared(tmp_path / "again2")[1]
    assert len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_an_empty_test_split_is_announced_and_a_fraction_rounding_to_none_is_a_warning(tmp_path, tokenizer, capsys):
    prepare(RECORDS, tokenizer, tmp_path / "asked", max_seq_length=256, test_split_size=0)
    out = capsys.readouterr().out
    assert "12 train + 0 test" in out and "No test split (--test_split_size 0)" in out
    assert "no held-out examples for its validation loss" in out and "Warning" not in out
    summary = prepare(RECORDS, tokenizer, tmp_path / "rounded", max_seq_length=256, test_split_size=0.04)
    out = capsys.readouterr().out
    assert summary["test_examples"] == 0
    assert "Warning: --test_split_size 0.04 of 12 records rounds to 0 examples: no test split" in out
    assert "validation loss" in out and "--test_split_size 1 or more" in out
    long = {"instruction": "word " * 200, "input": "", "output": "x"}  # too long for 256 tokens: dropped
    records = [long] * 2 + RECORDS

    def shuffled(seed):  # the order prepare splits: the first test_split_size records are the test split
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        return order

    seed = next(seed for seed in range(1000) if set(shuffled(seed)[:2]) == {0, 1})  # both long ones in test
    prepare(records, tokenizer, tmp_path / "dropped", max_seq_length=256, test_split_size=2, seed=seed)
    out = capsys.readouterr().out
    assert "12 train + 0 test" in out and "Warning: all 2 test examples were dropped (prompt too long)" in out
    prepare(RECORDS, tokenizer, tmp_path / "split", max_seq_length=256, test_split_size=2)
    assert "test split" not in capsys.readouterr().out


def test_data_from_another_tokenizer_is_refused(tmp_path, tokenizer):
    prepare(RECORDS, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=2)
    other = Tokenizer.train(["one two three four", "five six seven"] * 30, vocab_size=300, model_prefix=tmp_path / "o")
    with pytest.raises(ValueError, match="prepared with another tokenizer.*--checkpoint_dir"):
        load_prepared(tmp_path / "data", other)
    with pytest.raises(FileNotFoundError, match="prepare_data/alpaca.py"):
        load_prepared(tmp_path / "nothing")


def test_bad_input_names_the_file_line_record_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"bad.json, line 3, column \d+: not valid JSON"):
        load_records(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", output}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 3: not valid JSON"):
        load_records(bad_lines)
    missing = write_json(tmp_path / "missing.json", [RECORDS[0], {"instruction": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"record 1: missing the field 'output'.*--output_key"):
        load_records(missing)
    not_string = tmp_path / "types.jsonl"
    not_string.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 42}\n')
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): field 'output' must be a string, found int"):
        load_records(not_string)
    with pytest.raises(ValueError, match="holds no records"):
        load_records(write_json(tmp_path / "empty.json", []))


def test_null_input_means_no_input_and_a_null_instruction_or_output_is_named_null(tmp_path):
    records = load_records(write_json(tmp_path / "null.json", [{"instruction": "a", "input": None, "output": "b"}]))
    assert records == [{"instruction": "a", "input": "", "output": "b"}]
    null_output = tmp_path / "null_output.jsonl"
    null_output.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": "x", "output": null}\n')
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): field 'output' \(output\) is null; it must be a str"):
        load_records(null_output)
    with pytest.raises(ValueError, match=r"record 0: field 'question' \(instruction\) is null") as error:
        load_records(write_json(tmp_path / "q.json", [{"question": None, "answer": "b"}]), instruction_key="question",
                     output_key="answer")
    assert "missing" not in str(error.value)


def test_one_json_object_is_reported_as_such_naming_the_key_that_holds_the_records(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": RECORDS[:2]}, indent=2))  # pretty-printed: many lines
    with pytest.raises(ValueError, match=r"wrapped.json holds one JSON object spanning 15 lines, not records: "
                                         r"expected a JSON list of records .* or a JSONL file.*"
                                         r"under 'data' \(2 objects\).*jq '\.\[\"data\"\]' .*wrapped.json > records"):
        load_records(wrapped)
    on_one_line = write_json(tmp_path / "one_line.json", {"data": RECORDS[:2]})
    with pytest.raises(ValueError, match=r"one_line.json holds one JSON object, not records.*under 'data'"):
        load_records(on_one_line)
    pretty_record = tmp_path / "record.json"
    pretty_record.write_text(json.dumps(RECORDS[0], indent=2))
    with pytest.raises(ValueError, match=r"record.json holds one JSON object spanning 5 lines") as error:
        load_records(pretty_record)
    assert "JSONL" in str(error.value) and "under" not in str(error.value)  # no key holds a list of objects
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "data": [\n    {"instruction": "a" "output": "b"}\n  ]\n}')
    with pytest.raises(ValueError, match=r"broken.json, line 3, column 25: not valid JSON \(Expecting ','"):
        load_records(broken)
    # what decides is the text, not the name: one record on one line is JSONL, a list is a list
    assert load_records(write_json(tmp_path / "one.jsonl", RECORDS[0])) == [RECORDS[0]]
    assert len(load_records(write_json(tmp_path / "list.jsonl", RECORDS))) == len(RECORDS)


def test_a_file_that_is_not_utf8_is_refused_with_its_place_and_the_command_that_fixes_it(tmp_path):
    records = [{"instruction": "Un café ?", "output": "Oui."}]
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps(records, ensure_ascii=False, indent=1).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json, line 3 \(byte 29\): byte 0xe9 is not UTF-8.*"
                                         r"iconv -f LATIN1 -t UTF-8 .*latin1.json > .*latin1.utf8.json"):
        load_records(latin1)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(records[0]), encoding="utf-16")  # Python writes the byte-order mark first
    with pytest.raises(ValueError, match=r"utf16.jsonl is UTF-16, not UTF-8 .*iconv -f UTF-16 -t UTF-8"):
        load_records(utf16)
    utf16_unmarked = tmp_path / "utf16le.json"
    utf16_unmarked.write_text(json.dumps(records), encoding="utf-16-le")
    with pytest.raises(ValueError, match=r"utf16le.json, line 1 \(byte 1\): a NUL byte.*UTF-16"):
        load_records(utf16_unmarked)
    # a UTF-8 byte-order mark (as some Windows editors write) is simply accepted, in JSON and in JSONL
    for name, text in (("bom.json", json.dumps(records)), ("bom.jsonl", json.dumps(records[0]) + "\n")):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert load_records(tmp_path / name) == [{"instruction": "Un café ?", "input": "", "output": "Oui."}]


def test_a_failed_preparation_leaves_nothing_behind(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="leaves no training examples"):
        prepare(RECORDS, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=12)
    with pytest.raises(ValueError, match="No training example fits"):
        prepare(RECORDS, tokenizer, tmp_path / "data", max_seq_length=4, test_split_size=0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare(RECORDS, tokenizer, tmp_path / "mine", max_seq_length=256, test_split_size=2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_destination_that_is_a_file_or_a_link_is_refused_naming_it(tmp_path, tokenizer):
    a_file = tmp_path / "data.pt"
    a_file.write_text("mine")
    for destination in (a_file, a_file / "sub"):
        with pytest.raises(FileExistsError, match=r"--destination_path .*: .*data.pt is a file, not a folder.*"
                                                  r"Choose another path, or move the file away"):
            prepare(RECORDS, tokenizer, destination, max_seq_length=256, test_split_size=2)
    assert a_file.read_text() == "mine"
    prepare(RECORDS, tokenizer, tmp_path / "real", max_seq_length=256, test_split_size=2)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "broken_link").symlink_to(tmp_path / "nothing")
    for link in ("link", "broken_link"):
        with pytest.raises(FileExistsError, match=rf"--destination_path .*{link} is a symbolic link \(to .*\): .*"
                                                  "Give the target folder itself, or a new path"):
            prepare(RECORDS, tokenizer, tmp_path / link, max_seq_length=256, test_split_size=2)
    assert (tmp_path / "link").is_symlink() and len(load_prepared(tmp_path / "real")[1]) == 2


def test_a_failure_at_any_rename_leaves_a_complete_dataset_and_no_temporary_folder(tmp_path, tokenizer, monkeypatch):
    """Inject a failure at each os.replace of the swap (as a crash there would stop it) and look at what is left."""
    real_replace = os.replace
    renames = []

    def replace_failing_at(n):
        def replace(source, target):
            renames.append((source, target))
            if len(renames) == n:
                raise OSError(f"injected failure at rename {n}")
            real_replace(source, target)
        return replace

    def test_split_of(folder):  # tells the old dataset (2 test examples) from the new one (3)
        return len(load_prepared(folder)[1])

    # how many renames replacing a dataset takes (2 today: the old one aside, the new one in)
    prepare(RECORDS, tokenizer, tmp_path / "count" / "data", max_seq_length=256, test_split_size=2)
    monkeypatch.setattr(lit_lora.files.os, "replace", replace_failing_at(0))
    prepare(RECORDS, tokenizer, tmp_path / "count" / "data", max_seq_length=256, test_split_size=3)
    monkeypatch.undo()
    assert renames

    for n in range(1, len(renames) + 1):
        folder = tmp_path / f"fail_at_{n}"
        prepare(RECORDS, tokenizer, folder / "data", max_seq_length=256, test_split_size=2)  # the old dataset
        renames.clear()
        monkeypatch.setattr(lit_lora.files.os, "replace", replace_failing_at(n))
        with pytest.raises(OSError, match=f"injected failure at rename {n}"):
            prepare(RECORDS, tokenizer, folder / "data", max_seq_length=256, test_split_size=3)
        monkeypatch.undo()
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # the new files' folder is gone
        asides = [p for p in folder.glob(".data.old-*") if any(p.iterdir())]
        if (folder / "data").exists():
            assert test_split_of(folder / "data") in (2, 3) and not asides
        else:  # stopped in the middle of the swap: the old dataset is whole, aside under its hidden name
            assert [test_split_of(aside / "data") for aside in asides] == [2]

    # a first preparation that fails at its one rename (the new folder in) leaves nothing at all
    renames.clear()
    monkeypatch.setattr(lit_lora.files.os, "replace", replace_failing_at(1))
    with pytest.raises(OSError, match="injected"):
        prepare(RECORDS, tokenizer, tmp_path / "new" / "data", max_seq_length=256, test_split_size=3)
    monkeypatch.undo()
    assert list((tmp_path / "new").iterdir()) == []


def test_a_failure_at_the_first_rename_leaves_no_empty_folder_aside(tmp_path, tokenizer, monkeypatch):
    prepare(RECORDS, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=2)

    def fail(source, target):
        raise OSError("injected failure at rename 1")

    monkeypatch.setattr(lit_lora.files.os, "replace", fail)
    with pytest.raises(OSError, match="injected"):
        prepare(RECORDS, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=3)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


BAD_FLAGS = [  # (flag, value, words its error must contain)
    ("max_seq_length", 0, "--max_seq_length 0: must be at least 16 tokens"),
    ("max_seq_length", 15, "--max_seq_length 15: must be at least 16 tokens, room for a prompt and a response"),
    ("max_seq_length", -256, "--max_seq_length -256: must be at least 16"),
    ("test_split_size", -1, "--test_split_size -1: a count of examples must be 0 or more"),
    ("test_split_size", 1.0, "--test_split_size 1.0: a fraction must be at least 0 and below 1"),
    ("test_split_size", 1.5, "--test_split_size 1.5: a fraction must be at least 0 and below 1"),
    ("test_split_size", -0.1, "--test_split_size -0.1: a fraction must be at least 0"),
    ("test_split_size", float("nan"), "--test_split_size nan: a fraction must be at least 0 and below 1"),
    ("seed", -1, "--seed -1: must be 0 or more"),
    ("prompt_style", "vicuna", "--prompt_style vicuna: is not a prompt style; choose one of alpaca, llama3, chatml"),
]


@pytest.mark.parametrize("flag,value,words", BAD_FLAGS, ids=[f"{flag}={value}" for flag, value, _ in BAD_FLAGS])
def test_bad_flag_values_are_refused_naming_the_flag_the_value_and_the_rule(flag, value, words):
    from prepare_data.alpaca import AlpacaArgs
    from prepare_data.dolly import DollyArgs
    from prepare_data.json_data import JSONArgs

    for args_class in (PrepareArgs, AlpacaArgs, DollyArgs, JSONArgs):
        with pytest.raises(ValueError) as error:
            args_class(**{flag: value})
        assert str(error.value).startswith(words)


def test_good_flag_values_are_accepted():
    for values in ({"max_seq_length": 16}, {"test_split_size": 0}, {"test_split_size": 0.0},
                   {"test_split_size": 0.5}, {"test_split_size": 2000}, {"seed": 0}):
        PrepareArgs(**values)


def test_a_script_given_a_bad_flag_ends_with_one_line_and_exit_code_2(tmp_path):
    data_file = write_json(tmp_path / "mine.json", RECORDS)
    command = [sys.executable, str(ROOT / "prepare_data" / "json_data.py"), "--data_file", str(data_file),
               "--destination_path", str(tmp_path / "data"), "--test_split_size", "1.5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's lit_lora, whatever the environment installed
    env.pop("LIT_LORA_TRACEBACK", None)  # which would show the traceback instead of the one line
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: --test_split_size 1.5: a fraction must be at least 0 and below 1 "
                                          "(0.1 holds out 10%); a whole number is a count"]
    assert not (tmp_path / "data").exists()


def test_download_fails_in_one_line_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    source = write_json(tmp_path / "source.json", RECORDS)
    copy = tmp_path / "fetched" / "copy.json"
    assert download(source.as_uri(), copy) == copy and copy.read_bytes() == source.read_bytes()
    assert download("https://example.invalid/never-asked", copy) == copy  # an existing copy is reused

    def offline(url, timeout):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError) as error:
        download("https://example.invalid/data.json", tmp_path / "offline" / "data.json")
    message = str(error.value)
    assert "\n" not in message and message.startswith("Could not download https://example.invalid/data.json (")
    assert "Temporary failure in name resolution" in message and message.endswith("pass it with --data_file")
    assert list((tmp_path / "offline").glob("*")) == []

    class InterruptedResponse(io.BytesIO):  # sends some bytes, then the user presses Ctrl-C
        def read(self, size=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().read(5)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: InterruptedResponse(b"[1, 2, 3, 4, 5]"))
    with pytest.raises(KeyboardInterrupt):
        download("https://example.invalid/data.json", tmp_path / "interrupted" / "data.json")
    assert list((tmp_path / "interrupted").glob("*")) == []  # no partial file, hidden or .part


def test_dolly_field_mapping(tmp_path, tokenizer):
    from prepare_data.dolly import DollyArgs, main

    lines = [{"instruction": f"Summarise {i}.", "context": f"Text {i}", "response": f"Summary {i}", "category": "x"}
             for i in range(6)]
    data_file = tmp_path / "dolly.jsonl"
    data_file.write_text("\n".join(json.dumps(line) for line in lines))
    records = load_records(data_file, input_key="context", output_key="response")
    assert records[2] == {"instruction": "Summarise 2.", "input": "Text 2", "output": "Summary 2"}
    main(DollyArgs(data_file=data_file, checkpoint_dir=tokenizer.model_path.parent,
                   destination_path=tmp_path / "dolly", test_split_size=2, allow_checksum_mismatch=True))
    train, test, config = load_prepared(tmp_path / "dolly", tokenizer)
    assert (len(train), len(test), config["max_seq_length"]) == (4, 2, 1024)
    text = tokenizer.decode(train[0]["input_ids"])
    assert "### Input:\nText" in text and "### Response:\nSummary" in text


def test_public_datasets_are_fetched_from_a_fixed_commit_with_their_checksum():
    import prepare_data.alpaca as alpaca
    import prepare_data.dolly as dolly

    assert re.fullmatch(r"https://raw\.githubusercontent\.com/tloen/alpaca-lora/[0-9a-f]{40}/"
                        r"alpaca_data_cleaned_archive\.json", alpaca.URL)
    assert re.fullmatch(r"https://huggingface\.co/datasets/databricks/databricks-dolly-15k/resolve/[0-9a-f]{40}/"
                        r"databricks-dolly-15k\.jsonl", dolly.URL)
    for sha256 in (alpaca.SHA256, dolly.SHA256):
        assert sha256 is None or re.fullmatch(r"[0-9a-f]{64}", sha256)  # None: not known yet, printed unchecked


def test_a_data_file_that_is_not_the_pinned_one_is_refused_unless_allowed(tmp_path, tokenizer, monkeypatch, capsys):
    import prepare_data.alpaca as alpaca
    import prepare_data.dolly as dolly

    lines = [{"instruction": f"Summarise {i}.", "context": "", "response": f"Summary {i}"} for i in range(6)]
    data_file = tmp_path / "dolly.jsonl"
    data_file.write_text("\n".join(json.dumps(line) for line in lines))
    known = hashlib.sha256(data_file.read_bytes()).hexdigest()
    flags = dict(data_file=data_file, checkpoint_dir=tokenizer.model_path.parent, test_split_size=2)

    monkeypatch.setattr(dolly, "SHA256", known)  # the file is the pinned one
    dolly.main(dolly.DollyArgs(**flags, destination_path=tmp_path / "same"))
    assert load_prepared(tmp_path / "same")[2]["source_sha256"] == known

    monkeypatch.setattr(dolly, "SHA256", "0" * 64)  # it is another file
    with pytest.raises(ValueError, match=rf"dolly.jsonl is not the expected file: sha256 expected 0{{64}}, found "
                                         rf"{known}\. If it is your own version .*--allow_checksum_mismatch true; "
                                         "to prepare the published release instead, leave --data_file out"):
        dolly.main(dolly.DollyArgs(**flags, destination_path=tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    capsys.readouterr()
    dolly.main(dolly.DollyArgs(**flags, destination_path=tmp_path / "allowed", allow_checksum_mismatch=True))
    assert f"Warning: {data_file} is not the expected file: sha256 expected {'0' * 64}, found {known}" in (
        capsys.readouterr().out)
    assert load_prepared(tmp_path / "allowed")[2]["source_sha256"] == known
    # a downloaded file that is not the pinned one: damaged, or the release changed
    downloaded = tmp_path / "data" / "databricks-dolly-15k.jsonl"
    downloaded.parent.mkdir()
    downloaded.write_bytes(data_file.read_bytes())
    with pytest.raises(ValueError, match=rf"The download is damaged or the release changed: delete {downloaded} and "
                                         "run again to download it again"):
        dolly.main(dolly.DollyArgs(**{**flags, "data_file": None}, destination_path=tmp_path / "data" / "dolly"))

    # no known checksum: the file's is printed and recorded, not checked
    alpaca_file = write_json(tmp_path / "alpaca.json", RECORDS)
    alpaca_sha256 = hashlib.sha256(alpaca_file.read_bytes()).hexdigest()
    monkeypatch.setattr(alpaca, "SHA256", None)
    alpaca.main(alpaca.AlpacaArgs(**{**flags, "data_file": alpaca_file}, destination_path=tmp_path / "alpaca"))
    assert f"sha256 of {alpaca_file}: {alpaca_sha256} (no known checksum" in capsys.readouterr().out
    assert load_prepared(tmp_path / "alpaca")[2]["source_sha256"] == alpaca_sha256


def test_json_script_and_inspect_marks_exactly_the_loss_tokens(tmp_path, tokenizer, capsys):
    from prepare_data.inspect_data import main as inspect
    from prepare_data.json_data import JSONArgs, main

    data_file = write_json(tmp_path / "mine.json", [{"question": f"What is {i} + 1?", "answer": str(i + 1)}
                                                   for i in range(10)])
    main(JSONArgs(data_file=data_file, checkpoint_dir=tokenizer.model_path.parent, destination_path=tmp_path / "d",
                  instruction_key="question", output_key="answer", test_split_size=0.2))
    train, test, config = load_prepared(tmp_path / "d", tokenizer)
    assert (len(train), len(test)) == (8, 2)
    assert config["source_sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()  # your file, recorded
    text = inspect(data_dir=tmp_path / "d", index=1, checkpoint_dir=tokenizer.model_path.parent)
    answer = tokenizer.decode(train[1]["input_ids"][train[1]["labels"] != IGNORE_INDEX])
    assert text.startswith("<s>Below is an instruction") and text.count("[[") == 1
    assert text.endswith("### Response:\n[[" + answer + "</s>]]")
    assert "carry loss" in capsys.readouterr().out
    with pytest.raises(IndexError, match="has 8 train examples"):
        inspect(data_dir=tmp_path / "d", index=8, checkpoint_dir=tokenizer.model_path.parent)


# ---------------------------------------------------------------------------------------------------------
# Prompt styles


def test_the_chat_styles_are_the_instruct_models_own_formats():
    # what transformers' apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True) gives
    # with Meta-Llama-3-8B-Instruct's template (less its BOS) and SmolLM2-Instruct's, which trims nothing
    assert format_prompt("  Add the numbers. ", "12 and 30\n", style="llama3") == (
        "<|start_header_id|>user<|end_header_id|>\n\nAdd the numbers. \n\n12 and 30<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert format_prompt("Say hello.", style="chatml") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    assert format_prompt("Say hello.") == format_prompt("Say hello.", style="alpaca")  # the default
    with pytest.raises(ValueError, match=re.escape("Unknown prompt style 'vicuna': choose one of alpaca, llama3, chatml")):
        format_prompt("Say hello.", style="vicuna")


def test_a_style_ends_the_response_with_its_own_token_instead_of_eos(tmp_path):
    from lit_lora.prompts import response_stop_ids
    from tests.conftest import make_tokenizer_json_dir

    tokenizer = Tokenizer(make_tokenizer_json_dir(tmp_path / "llama3-base", "llama3", instruct=False))
    eot, end_of_text = (tokenizer.json_tokenizer.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert tokenizer.eos_id == end_of_text and tokenizer.stop_ids == (end_of_text,)  # Llama 3 base
    record = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    example = tokenize_example(record, tokenizer, max_seq_length=256, style="llama3")
    prompt = tokenizer.encode(format_prompt("Say hello.", style="llama3"), bos=True)
    assert example["input_ids"].tolist() == prompt.tolist() + tokenizer.encode("Hello!", bos=False).tolist() + [eot]
    assert example["input_ids"][0] == tokenizer.bos_id and end_of_text not in example["input_ids"].tolist()
    assert example["labels"][-1] == eot  # the model learns to end its answer with <|eot_id|>
    cut = tokenize_example(record, tokenizer, max_seq_length=len(example["input_ids"]) - 1, style="llama3")
    assert cut["truncated"] and eot not in cut["input_ids"][len(prompt):].tolist()  # only after a whole response
    assert response_stop_ids(tokenizer, "llama3") == (end_of_text, eot)  # so generation stops there
    assert response_stop_ids(tokenizer, "alpaca") == (end_of_text,)
    assert tokenize_example(record, tokenizer, max_seq_length=256)["input_ids"][-1] == end_of_text  # alpaca: EOS


def test_a_style_whose_end_is_not_one_token_works_as_text(tokenizer, smollm2_tokenizer_dir):
    from lit_lora.prompts import response_stop_ids

    record = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    example = tokenize_example(record, tokenizer, max_seq_length=256, style="llama3")  # SentencePiece: <|eot_id|> is text
    assert example["input_ids"][-1] == tokenizer.eos_id  # so EOS follows it: generation stops at an id
    assert tokenizer.decode(example["input_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert response_stop_ids(tokenizer, "llama3") == tokenizer.stop_ids == (tokenizer.eos_id,)

    smollm2 = Tokenizer(smollm2_tokenizer_dir)  # <|im_end|> is SmolLM2-Instruct's EOS: one token, ending the answer once
    example = tokenize_example(record, smollm2, max_seq_length=256, style="chatml")
    chat, labels = example["input_ids"].tolist(), example["labels"].tolist()
    # the answer ends with <|im_end|> once, and is learned through it; the newline after it is the template's, as
    # SmolLM2's template writes it after every turn (an instruction record is the conversation of one exchange)
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert learned[-1] == smollm2.eos_id == 2 and learned.count(2) == 1 and chat[-2] == 2 and chat[-1] != 2
    expected = smollm2.encode(format_prompt("Say hello.", style="chatml") + "Hello!<|im_end|>\n", bos=False)
    assert chat == expected.tolist()
    assert response_stop_ids(smollm2, "chatml") == (2,)


@pytest.mark.parametrize("family, style", [("sentencepiece", "llama3"), ("sentencepiece", "chat_template"),
                                           ("llama3", "llama3"), ("smollm2", "chatml"), ("smollm2", "chat_template")])
def test_an_instruction_record_is_tokenized_as_its_one_exchange_conversation(tmp_path, tokenizer_path, family, style):
    """One path, one rule: an instruction record in a chat style is the conversation of its user turn and answer,
    whatever the tokenizer (a SentencePiece model reads <|eot_id|> as text, followed by EOS), answer trimmed or not
    as the style trims it."""
    import shutil

    from tests.conftest import make_tokenizer_json_dir
    from tests.test_chat import LLAMA2_TEMPLATE, SMOLLM2_TEMPLATE

    folder = tmp_path / family
    if family == "sentencepiece":
        folder.mkdir()
        shutil.copy(tokenizer_path, folder / "tokenizer.model")
    else:
        make_tokenizer_json_dir(folder, family)
    (folder / "chat_template.jinja").write_text(LLAMA2_TEMPLATE if family == "sentencepiece" else SMOLLM2_TEMPLATE)
    tokenizer = Tokenizer(folder)
    record = {"instruction": "Add the numbers.", "input": "12 and 30", "output": " 42 "}
    conversation = {"messages": [{"role": "user", "content": "Add the numbers.\n\n12 and 30"},
                                 {"role": "assistant", "content": " 42 "}]}
    for system_prompt in (None, "Be exact."):
        whole = tokenize_example(conversation, tokenizer, 256, style=style, system_prompt=system_prompt)
        whole = len(whole["input_ids"])
        for max_seq_length in (256, whole - 1):  # whole, and cut
            as_record, as_conversation = (tokenize_example(r, tokenizer, max_seq_length, style=style,
                                                           system_prompt=system_prompt) for r in (record, conversation))
            assert as_record["truncated"] == as_conversation["truncated"] == (max_seq_length < whole)
            assert as_record["input_ids"].tolist() == as_conversation["input_ids"].tolist()
            assert as_record["labels"].tolist() == as_conversation["labels"].tolist()
    if family == "sentencepiece" and style == "llama3":  # the end of a turn is text: EOS ends the conversation
        example = tokenize_example(counting_conversation(), tokenizer, 256, style=style)
        assert example["input_ids"][-1] == example["labels"][-1] == tokenizer.eos_id
        assert tokenizer.decode(example["labels"][example["labels"] != IGNORE_INDEX]).count("<|eot_id|>") == 2


def counting_conversation() -> dict:
    return {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
                         {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "4"}]}


def test_prepare_records_the_style_and_finetuning_reads_it(tmp_path, llama3_tokenizer_dir):
    from lit_lora.data import prepared_prompt_format
    from prepare_data.inspect_data import main as inspect
    from prepare_data.json_data import JSONArgs, main

    data_file = write_json(tmp_path / "mine.json", RECORDS)
    main(JSONArgs(data_file=data_file, checkpoint_dir=llama3_tokenizer_dir, destination_path=tmp_path / "d",
                  test_split_size=2, prompt_style="llama3"))
    train, _, config = load_prepared(tmp_path / "d", Tokenizer(llama3_tokenizer_dir))
    assert config["prompt_style"] == prepared_prompt_format(tmp_path / "d")["style"] == "llama3"
    text = inspect(data_dir=tmp_path / "d", index=0)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>") and text.endswith("<|eot_id|>]]")
    (tmp_path / "d" / "prepare_config.json").write_text(json.dumps(config | {"prompt_style": "vicuna"}))
    with pytest.raises(ValueError, match="prepare_config.json: prompt_style 'vicuna' is not one of alpaca, llama3, chatml"):
        load_prepared(tmp_path / "d")
    del config["prompt_style"]  # data prepared before there were styles
    (tmp_path / "d" / "prepare_config.json").write_text(json.dumps(config))
    assert prepared_prompt_format(tmp_path / "d")["style"] == "alpaca"


def test_collate_right_pads():
    examples = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
                {"input_ids": torch.tensor([1, 7, 8, 9, 2]), "labels": torch.tensor([-100, -100, 8, 9, 2])}]
    input_ids, labels = collate(examples, max_seq_length=16)
    assert input_ids.tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert labels.tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 8, 9, 2]]
    assert collate(examples, max_seq_length=4)[0].shape == (2, 4)


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="../shared/data/gsm8k-alpaca.json is not here (a user's clone)")
def test_real_alpaca_format_data(tmp_path, tokenizer):
    records = load_records(SHARED_DATA)
    assert len(records) == 7473 and all(r["input"] == "" for r in records[:50])
    prepare(records[:200], tokenizer, tmp_path / "gsm8k", max_seq_length=512, test_split_size=20)
    train, test, config = load_prepared(tmp_path / "gsm8k", tokenizer)
    assert len(train) + len(test) + config["dropped"] == 200
    # a whole answer ends in EOS; a cut one fills max_seq_length and has no EOS
    without_eos = [e for e in train + test if e["input_ids"][-1].item() != tokenizer.eos_id]
    assert len(without_eos) == config["truncated"] > 0
    assert all(len(e["input_ids"]) == 512 and tokenizer.eos_id not in e["input_ids"].tolist() for e in without_eos)
