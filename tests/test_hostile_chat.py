"""Chat templates and conversations that are broken or hostile: each ends in one `error:` line that names its cause
(the template's file, the record and turn), in bounded time and memory, in prepare_data, generate and --interactive.

A chat template is code from the Hub that every conversation runs; a conversation file is data from anywhere.
"""

import json
import shutil
import time
from pathlib import Path

import pytest

import lit_lora.chat_template as chat_template
from tests.conftest import make_checkpoint, make_tokenizer_json_dir, run_command
from tests.test_chat import SHAREGPT, SMOLLM2_TEMPLATE, write_jsonl

# name: (template, words the error line says)
BAD_TEMPLATES = {
    "overflow": ("{{ 10.0 ** 400 }}", "OverflowError"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    "zero division": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "type": ("{{ messages + 1 }}", "TypeError"),
    "include": ("{% include 'other.jinja' %}", "no loader"),
    "import": ("{% import 'macros.jinja' as m %}", "no loader"),
    "extends": ("{% extends 'base.jinja' %}", "no loader"),
    "undefined filter": ("{{ messages | shout }}", "No filter named 'shout'"),
    "syntax": ("{% for message in messages %}", "cannot be read as Jinja"),
    "huge product": ("{{ 'x' * 10**10 }}", "too large"),
    "huge power": ("{{ 7 ** (10**10) }}", "too large"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "too large"),
    "replace": ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('x', ns.s) %}"
                "{% endfor %}{{ ns.s }}", "MemoryError"),
    "centered": ("{{ 'x' | center(10**10) }}", "too large"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "1 s"),
    "endless output": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'many words ' }}{% endfor %}"
                       "{% endfor %}", "characters"),
    "empty": ("{% if false %}{{ messages }}{% endif %}", "wrote nothing"),
}


@pytest.fixture
def quick_deadline(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)


def smollm2_folder(folder: Path, template: str, layout: str = "jinja") -> Path:
    make_tokenizer_json_dir(folder, "smollm2")
    if layout == "jinja":
        (folder / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize("name", BAD_TEMPLATES)
def test_a_bad_template_is_one_line_naming_its_file_in_prepare_and_generate(tmp_path, quick_deadline, name):
    template, words = BAD_TEMPLATES[name]
    layout = "tokenizer_config" if name == "zero division" else "jinja"
    folder = smollm2_folder(tmp_path / "tok", template, layout)
    template_file = "tokenizer_config.json" if layout == "tokenizer_config" else "chat_template.jinja"
    start = time.perf_counter()
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data")
    line = one_error_line(err)
    assert code == 1 and words in line and str(folder / template_file) in line and "c.jsonl, record" in line
    assert not (tmp_path / "data").exists() and time.perf_counter() - start < 20
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=64)
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "Hi",
                               "--prompt_style", "chat_template", "--max_new_tokens", "2")
    line = one_error_line(err)
    assert code == 1 and words in line and str(checkpoint / template_file) in line


def test_the_interactive_chat_survives_a_turn_the_template_fails_on(tmp_path, monkeypatch, capsys):
    import lit_lora.chat as chat
    from generate.base import main
    from lit_lora.chat import GenerateArgs

    failing = "{% if messages[-1]['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}" + SMOLLM2_TEMPLATE
    checkpoint = make_checkpoint(tmp_path / "base", smollm2_folder(tmp_path / "tok", failing), block_size=128)
    seen, real = [], chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", lambda m, p, *a, **k: seen.append(p) or real(m, p, *a, **k))
    lines = iter(["boom", "Hi there.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(GenerateArgs(checkpoint_dir=checkpoint, interactive=True, prompt_style="chat_template", max_new_tokens=2,
                      temperature=0.0))
    err = capsys.readouterr().err
    assert f"error: the chat template failed on the conversation (ZeroDivisionError: integer division or modulo by " \
           f"zero; raised by {checkpoint / 'chat_template.jinja'})" in err
    assert len(seen) == 1  # the next line was answered


def test_a_chat_template_that_is_not_utf8_is_named(tmp_path):
    folder = make_tokenizer_json_dir(tmp_path / "tok", "smollm2")
    (folder / "chat_template.jinja").write_bytes(SMOLLM2_TEMPLATE.encode("utf-8") + b"{# caf\xe9 #}")
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data")
    line = one_error_line(err)
    assert code == 1 and str(folder / "chat_template.jinja") in line and "not UTF-8" in line and "byte 0xe9" in line


def test_a_sentencepiece_folder_names_its_template_too(tmp_path, tokenizer_path, quick_deadline):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    (folder / "chat_template.jinja").write_text("{{ 1 // 0 }}")
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data")
    assert code == 1 and str(folder / "chat_template.jinja") in one_error_line(err)


# ---------------------------------------------------------------------------------------------------------
# Conversations: long ones in time linear in their turns, bad ones in one line naming the record and turn


def counting_conversation(exchanges: int) -> list[dict]:
    return [{"role": "system", "content": "Count."}] + [
        message for i in range(exchanges)
        for message in ({"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)})]


def test_a_conversation_of_10000_turns_prepares_in_seconds_keeping_the_most_exchanges_that_fit(tmp_path):
    from lit_lora.conversations import tokenize_conversation
    from lit_lora.prompts import render_chat
    from lit_lora.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE))
    messages = counting_conversation(5000)
    start = time.perf_counter()
    example = tokenize_conversation(messages, tokenizer, max_seq_length=256)
    assert time.perf_counter() - start < 10
    dropped = example["dropped_turns"]
    kept = messages[:1] + messages[1 + 2 * dropped:]
    alone = tokenize_conversation(kept, tokenizer, max_seq_length=256)
    assert alone["dropped_turns"] == 0 and alone["input_ids"].tolist() == example["input_ids"].tolist()
    one_more = messages[:1] + messages[1 + 2 * (dropped - 1):]  # an exchange more does not fit
    assert len(tokenizer.encode_with_offsets(render_chat(one_more, "chat_template", False, tokenizer))[0]) > 256


def test_a_long_preparation_shows_its_progress(tmp_path, monkeypatch):
    import lit_lora.data

    monkeypatch.setattr(lit_lora.data, "PROGRESS_SECONDS", 0.0)
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data")
    assert code == 0 and "tokenized 5 of 10 records (50%)" in err


BIG = "word " * 10_000_000  # a single turn of 50 MB

BAD_RECORDS = {
    "role of the wrong type": ('{"messages": [{"role": ["user"], "content": "Hi"}, {"role": "assistant", '
                               '"content": "Hello"}]}', "record 0 (line 1), turn 0: the role ['user'] is not one of"),
    "content of the wrong type": ('{"messages": [{"role": "user", "content": {"text": "Hi"}}]}',
                                  "record 0 (line 1), turn 0 (user): content must be text"),
    "lone surrogate in a turn": ('{"messages": [{"role": "user", "content": "Hi \\ud800"}, {"role": "assistant", '
                                 '"content": "Hello"}]}',
                                 "record 0 (line 1), turn 0 (user): content is not valid UTF-8"),
    "lone surrogate in an instruction": ('{"instruction": "Say hi \\udc80", "output": "Hi"}',
                                         "record 0 (line 1): field 'instruction' is not valid UTF-8"),
    "a 50 MB turn": (json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": BIG}]}),
                     "record 0: turn 1 (assistant) is 50,000,000 characters"),
}


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_a_bad_record_is_one_line_naming_the_record_and_turn(tmp_path, name):
    line, words = BAD_RECORDS[name]
    (tmp_path / "c.jsonl").write_text(line)
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    start = time.perf_counter()
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", tmp_path / "c.jsonl", "--checkpoint_dir",
                               folder, "--destination_path", tmp_path / "data", "--test_split_size", "0")
    assert code == 1 and words in one_error_line(err) and time.perf_counter() - start < 20
    assert not (tmp_path / "data").exists()


def test_a_system_prompt_that_is_not_utf8_is_named(tmp_path):
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data",
                               "--system_prompt", "Caf\udce9")  # the byte 0xE9 (Latin-1 é) on a UTF-8 command line
    assert code == 2 and "--system_prompt is not valid UTF-8" in one_error_line(err)
    from lit_lora.prompts import render_chat
    from lit_lora.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="The system turn is not valid UTF-8: character 4"):  # a recorded one
        render_chat([{"role": "system", "content": "Caf\udce9"}, {"role": "user", "content": "Hi"}], "chat_template",
                    True, Tokenizer(folder))


# ---------------------------------------------------------------------------------------------------------
# Errors that name the real cause


def test_conversations_without_any_answer_are_named_as_such(tmp_path):
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    records = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", records),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data",
                               "--test_split_size", "0")
    line = one_error_line(err)
    assert code == 1 and "none of the 3 conversations ends with an assistant turn" in line
    assert "max_seq_length" not in line


def test_a_system_prompt_longer_than_the_context_is_named(tmp_path, monkeypatch):
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    long_prompt = "Answer with care. " * 30  # 540 characters: a few hundred tokens
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                               "--checkpoint_dir", folder, "--destination_path", tmp_path / "data",
                               "--system_prompt", long_prompt, "--max_seq_length", "64")
    line = one_error_line(err)
    assert code == 1 and "the system prompt alone (--system_prompt) is" in line and "max_seq_length=64" in line
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=64)
    monkeypatch.setattr("builtins.input", lambda prompt="": "Hi")
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", checkpoint, "--interactive", "true",
                               "--prompt_style", "chat_template", "--system_prompt", long_prompt)
    assert code == 1 and "the system prompt alone is" in err and "the model's context is 64" in err


def test_a_system_prompt_longer_than_the_context_is_named_in_one_shot_generation(tmp_path):
    """generate/*.py --prompt: the system prompt is named, not "the prompt is N tokens: shorten the prompt"."""
    folder = smollm2_folder(tmp_path / "tok", SMOLLM2_TEMPLATE)
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=64)
    for long_prompt in ("Answer with care. " * 30, "word " * 100_000):  # a few hundred tokens; far beyond
        code, _, err = run_command("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "Hi",
                                   "--prompt_style", "chat_template", "--system_prompt", long_prompt)
        line = one_error_line(err)
        assert code == 1 and "the system prompt alone is" in line and "the model's context is 64" in line
        assert "shorten the prompt" not in line
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "Hi",
                               "--prompt_style", "chat_template", "--system_prompt", "caf\udce9")  # argv of the byte 0xE9
    assert code == 2 and "--system_prompt is not valid UTF-8" in one_error_line(err)
