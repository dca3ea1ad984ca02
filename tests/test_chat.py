"""Chat models end to end: the checkpoint's own chat template rendered as transformers renders it, conversations of
several turns as data with the loss on the assistant's turns only, the format recorded by every finetune and used by
generate, and the template carried by conversion and export.

The templates are the real ones, Jinja text as Meta-Llama-3-8B-Instruct's and SmolLM2-Instruct's
tokenizer_config.json hold them; the tokenizers are small ones of those families, built in conftest.py.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lit_lora.conversations import IGNORE_INDEX, tokenize_conversation
from lit_lora.data import load_prepared
from lit_lora.prompts import render_chat
from lit_lora.tokenizer import Tokenizer
from tests.conftest import make_checkpoint, make_tokenizer_json_dir, run_command

transformers = pytest.importorskip("transformers")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}
# Llama-2-7b-chat-hf's template (tokenizer_config.json): a SentencePiece model's, writing <s> and </s> as text
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

CONVERSATION = [
    {"role": "system", "content": "Answer in few words."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": " And 4 + 4? "},
    {"role": "assistant", "content": "8."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def chat_folder(folder: Path, family: str, layout: str = "jinja") -> Path:
    """A tokenizer.json folder of `family` with its real chat template, where transformers 5 writes it
    (chat_template.jinja) or transformers 4 (tokenizer_config.json's chat_template)."""
    make_tokenizer_json_dir(folder, family)
    if layout == "jinja":
        (folder / "chat_template.jinja").write_text(TEMPLATES[family])
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATES[family]}))
    return folder


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def family_folder(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, chat_folder(tmp_path_factory.mktemp(request.param), request.param)


def conversations_to_check() -> list[list[dict]]:
    """With and without a system prompt, 1 to 3 turns."""
    without_system = CONVERSATION[1:]
    return [CONVERSATION[:2 * turns + 1] for turns in (1, 2, 3)] + [without_system[:2 * turns] for turns in (1, 2, 3)]


@pytest.mark.parametrize("layout", ["jinja", "tokenizer_config"])
def test_the_chat_template_renders_and_encodes_as_apply_chat_template(tmp_path, family_folder, layout):
    family, _ = family_folder
    folder = chat_folder(tmp_path / family, family, layout)
    ours, theirs = Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template == TEMPLATES[family]
    for messages in conversations_to_check():
        for add_generation_prompt in (False, True):
            prompt = messages[:-1] if add_generation_prompt else messages  # a generation prompt after a user turn
            text = render_chat(prompt, "chat_template", add_generation_prompt, ours)
            assert text == theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
            ids = theirs.apply_chat_template(prompt, tokenize=True, add_generation_prompt=add_generation_prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.encode_with_offsets(text)[0] == list(ids)


def test_the_loss_is_on_every_assistant_turn_and_its_end_token_and_nothing_else(family_folder):
    family, folder = family_folder
    tokenizer = Tokenizer(folder)
    end = {"llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}[family]
    for messages in conversations_to_check():
        example = tokenize_conversation(messages, tokenizer, max_seq_length=1024)
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        assert ids == tokenizer.encode_with_offsets(render_chat(messages, "chat_template", False, tokenizer))[0]
        runs, run = [], []  # the labelled tokens, token by token, as runs of consecutive tokens
        for i, (token, label) in enumerate(zip(ids, labels)):
            assert label in (IGNORE_INDEX, token)
            if label != IGNORE_INDEX:
                run.append(token)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        decoded = [tokenizer.json_tokenizer.decode(r, skip_special_tokens=False) for r in runs]
        assert decoded == [answer + end for answer in answers]


def test_a_too_long_conversation_loses_its_earliest_exchanges_first_keeping_the_system_turn(family_folder):
    family, folder = family_folder
    tokenizer = Tokenizer(folder)
    whole = tokenize_conversation(CONVERSATION, tokenizer, max_seq_length=1024)
    last_two = CONVERSATION[:1] + CONVERSATION[3:]
    shorter = tokenize_conversation(CONVERSATION, tokenizer, max_seq_length=len(whole["input_ids"]) - 1)
    assert shorter["dropped_turns"] == 1 and not shorter["truncated"]
    assert shorter["input_ids"].tolist() == tokenize_conversation(last_two, tokenizer, 1024)["input_ids"].tolist()
    last = CONVERSATION[:1] + CONVERSATION[5:]
    cut = tokenize_conversation(CONVERSATION, tokenizer, len(tokenize_conversation(last, tokenizer, 1024)["input_ids"]) - 2)
    assert cut["dropped_turns"] == 2 and cut["truncated"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records))
    return path


SHAREGPT = [{"conversations": [{"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)},
                               {"from": "human", "value": "Twice that?"}, {"from": "gpt", "value": str(2 * i + 2)}]}
            for i in range(10)]


def test_conversations_prepare_in_the_checkpoints_template_by_default(tmp_path, capsys):
    folder = chat_folder(tmp_path / "tok", "smollm2")
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=256)
    data_file = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    code, out, err = run_command("prepare_data/json_data.py", "--data_file", data_file, "--checkpoint_dir", checkpoint,
                                 "--destination_path", tmp_path / "data", "--test_split_size", "2",
                                 "--system_prompt", "Be exact.")
    assert code == 0, err
    train, _, config = load_prepared(tmp_path / "data", Tokenizer(checkpoint))
    assert config["prompt_style"] == "chat_template" and config["system_prompt"] == "Be exact."
    assert config["chat_template_sha256"] is not None and len(train) == 8
    code, out, _ = run_command("prepare_data/inspect_data.py", "--data_dir", tmp_path / "data", "--checkpoint_dir",
                               checkpoint, "--index", "0")
    text = out.split("\n", 1)[1]  # after the summary line
    assert text.count("[[") == 2 and "<|im_start|>system\nBe exact.<|im_end|>" in text  # two answers train
    assert re.search(r"<\|im_start\|>assistant\n\[\[\d+<\|im_end\|>\]\]", out)


@pytest.mark.parametrize("records, words", [
    ([{"messages": [{"role": "robot", "content": "Hi"}]}], "turn 0: the role 'robot' is not one of system, user, "),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}], "turn 1 (gpt): value must be text"),
    ([{"messages": []}], "messages must be a list of turns"),
])
def test_bad_conversations_are_one_line_naming_the_record(tmp_path, records, words):
    folder = chat_folder(tmp_path / "tok", "smollm2")
    data_file = write_jsonl(tmp_path / "chats.jsonl", records)
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", data_file, "--checkpoint_dir", folder,
                               "--destination_path", tmp_path / "data")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "chats.jsonl, record 0 (line 1)" in err and words in err
    assert not (tmp_path / "data").exists()


def test_conversations_without_an_answer_are_counted_and_a_template_that_refuses_names_the_record(tmp_path, capsys):
    folder = chat_folder(tmp_path / "tok", "smollm2")
    records = SHAREGPT + [{"messages": [{"role": "user", "content": "Hello?"}]}]  # nothing to learn: left out
    code, out, err = run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", records),
                                 "--checkpoint_dir", folder, "--destination_path", tmp_path / "d", "--test_split_size", "0")
    assert code == 0 and "1 conversations without a last answer left out" in out
    (folder / "chat_template.jinja").write_text("{{ raise_exception('Conversation roles must alternate') }}")
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", tmp_path / "c.jsonl", "--checkpoint_dir",
                               folder, "--destination_path", tmp_path / "e")
    assert code == 1 and re.search(r"c\.jsonl, record \d+: the chat template refused the conversation: Conversation "
                                   "roles must alternate", err)
    plain = make_tokenizer_json_dir(tmp_path / "plain", "smollm2")  # no template
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", tmp_path / "c.jsonl", "--checkpoint_dir",
                               plain, "--destination_path", tmp_path / "f")
    assert code == 1 and "has no chat template: choose a chat style with --prompt_style llama3 or chatml" in err
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", tmp_path / "c.jsonl", "--checkpoint_dir",
                               plain, "--destination_path", tmp_path / "f", "--prompt_style", "chat_template")
    assert code == 1 and "has no chat template" in err and "alpaca, llama3, chatml" in err


def test_the_template_travels_through_conversion_and_export(tmp_path, family_folder):
    from lit_lora.convert.hf import export_hf_checkpoint, hf_files_to_download

    family, folder = family_folder
    checkpoint = make_checkpoint(tmp_path / "lit", folder)
    assert (checkpoint / "chat_template.jinja").read_text() == TEMPLATES[family]
    export_hf_checkpoint(checkpoint, tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tokenizer = Tokenizer(checkpoint)
    for messages in conversations_to_check():
        assert exported.apply_chat_template(messages, tokenize=False) == render_chat(messages, "chat_template", False,
                                                                                      tokenizer)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATES[family]
    assert "chat_template.jinja" in hf_files_to_download(["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json", "chat_template.jinja"])


def sentencepiece_chat_folder(folder: Path, tokenizer_path: Path) -> Path:
    """A folder with the SentencePiece tokenizer.model trained in conftest.py and Llama 2 chat's template."""
    folder.mkdir(parents=True)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    (folder / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    return folder


def test_a_sentencepiece_model_with_a_chat_template_prepares_and_generates(tmp_path, tokenizer_path):
    folder = sentencepiece_chat_folder(tmp_path / "tok", tokenizer_path)
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=256)
    tokenizer = Tokenizer(checkpoint)
    text = render_chat(CONVERSATION, "chat_template", False, tokenizer)
    assert text.startswith("<s>[INST] <<SYS>>\nAnswer in few words.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] "
                           "2 + 3 = 5. </s>")
    ids, offsets = tokenizer.encode_with_offsets(text)
    # as transformers' LlamaTokenizer reads a template's text: <s> and </s> are BOS and EOS, the rest SentencePiece's
    expected = [i for part in re.split("(<s>|</s>)", text) if part
                for i in ({"<s>": [1], "</s>": [2]}.get(part) or tokenizer.processor.encode(part))]
    assert ids == expected and len(offsets) == len(ids)
    for token_id, (start, end) in zip(ids, offsets):  # each token covers the characters it was read from
        piece = tokenizer.processor.id_to_piece(token_id).replace("\u2581", " ")
        assert text[start:end] in ("", piece) or piece.startswith("<0x")

    data_file = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    code, _, err = run_command("prepare_data/json_data.py", "--data_file", data_file, "--checkpoint_dir", checkpoint,
                               "--destination_path", tmp_path / "data", "--test_split_size", "2")
    assert code == 0, err
    train, _, config = load_prepared(tmp_path / "data", tokenizer)
    assert config["prompt_style"] == "chat_template" and len(train) == 8
    example = train[0]
    answers = tokenizer.decode(example["labels"][example["labels"] != IGNORE_INDEX].tolist())
    assert re.fullmatch(r"\d+ +\d+", answers.strip()) and example["labels"][-1] == tokenizer.eos_id  # 2 answers, </s>
    code, out, err = run_command("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "What is 2 + 3?",
                                 "--prompt_style", "chat_template", "--max_new_tokens", "3", "--temperature", "0")
    assert code == 0 and "error" not in err, err


def test_a_finetune_records_its_format_and_generate_uses_it(tmp_path, monkeypatch, capsys):
    import lit_lora.chat as chat
    from finetune.lora import main as finetune
    from generate.lora import LoRAGenerateArgs
    from generate.lora import main as generate
    from lit_lora.method_files import read_lora_file
    from tests.conftest import lora_args

    folder = chat_folder(tmp_path / "tok", "llama3")
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=256)
    run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                "--checkpoint_dir", checkpoint, "--destination_path", tmp_path / "data", "--test_split_size", "2",
                "--system_prompt", "Be exact.")
    finetune(lora_args(checkpoint, tmp_path / "data", tmp_path / "out", max_steps=2, eval_interval=0))
    prompt = read_lora_file(tmp_path / "out" / "lit_lora_finetuned.pth")["prompt"]
    assert prompt["style"] == "chat_template" and prompt["system_prompt"] == "Be exact."
    assert json.loads((tmp_path / "out" / "hyperparameters.json").read_text())["prompt"] == prompt

    seen, real = [], chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", lambda m, prompts, *a, **k: seen.append(prompts[0].tolist())
                        or real(m, prompts, *a, **k))
    args = dict(checkpoint_dir=checkpoint, lora_path=tmp_path / "out" / "lit_lora_finetuned.pth",
                prompt="What is 5 + 1?", max_new_tokens=3, temperature=0.0)
    generate(LoRAGenerateArgs(**args))  # no --prompt_style: the recorded format, system prompt and all
    tokenizer = Tokenizer(checkpoint)
    expected = render_chat([{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 5 + 1?"}],
                           "chat_template", True, tokenizer)
    assert seen[-1] == tokenizer.encode_with_offsets(expected)[0] and "Warning" not in capsys.readouterr().err
    generate(LoRAGenerateArgs(**args, prompt_style="alpaca"))
    assert "Warning: --prompt_style alpaca, but the model was finetuned in the chat_template style" in (
        capsys.readouterr().err)


def test_interactive_chat_keeps_the_conversation_resets_and_trims_it(tmp_path, monkeypatch, capsys):
    import lit_lora.chat as chat
    from generate.base import main
    from lit_lora.chat import GenerateArgs

    folder = chat_folder(tmp_path / "tok", "smollm2")
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=160)
    tokenizer = Tokenizer(checkpoint)
    seen, real = [], chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", lambda m, prompts, *a, **k: seen.append(prompts[0].tolist())
                        or real(m, prompts, *a, **k))
    lines = iter(["Hi there.", "And then?", "/reset", "Again.", "A " * 20, "B " * 20, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(GenerateArgs(checkpoint_dir=checkpoint, interactive=True, prompt_style="chat_template", max_new_tokens=4,
                      temperature=0.0, system_prompt="Be brief."))
    texts = [tokenizer.json_tokenizer.decode(ids, skip_special_tokens=False) for ids in seen]
    assert texts[0].count("<|im_start|>user") == 1 and "Be brief." in texts[0]
    assert texts[1].count("<|im_start|>user") == 2 and "Hi there." in texts[1]  # the first exchange is kept
    assert texts[2].count("<|im_start|>user") == 1 and "Again." in texts[2]  # /reset started over
    assert "B B" in texts[4] and "Again." not in texts[4]  # the oldest exchanges no longer fit: left out
    assert "no longer fit in the context: left out" in capsys.readouterr().err


def test_adapter_and_full_finetunes_record_the_format_too(tmp_path):
    from finetune.adapter import AdapterArgs
    from finetune.adapter import main as adapter
    from finetune.full import FullArgs
    from finetune.full import main as full
    from lit_lora.checkpoint import load_model, read_config
    from lit_lora.method_files import load_adapter, read_adapter_file

    folder = chat_folder(tmp_path / "tok", "smollm2")
    checkpoint = make_checkpoint(tmp_path / "base", folder, block_size=256)
    run_command("prepare_data/json_data.py", "--data_file", write_jsonl(tmp_path / "c.jsonl", SHAREGPT),
                "--checkpoint_dir", checkpoint, "--destination_path", tmp_path / "data", "--test_split_size", "0",
                "--system_prompt", "Be exact.")
    common = dict(checkpoint_dir=checkpoint, data_dir=tmp_path / "data", precision="32-true", global_batch_size=4,
                  micro_batch_size=4, max_steps=1, eval_interval=0, eval_max_new_tokens=0)
    adapter(AdapterArgs(out_dir=tmp_path / "adapter", adapter_start_layer=1, **common))
    full(FullArgs(out_dir=tmp_path / "full", **common))
    recorded = read_adapter_file(tmp_path / "adapter" / "lit_adapter_finetuned.pth")["prompt"]
    assert recorded["style"] == "chat_template" and recorded["system_prompt"] == "Be exact."
    assert read_config(tmp_path / "full" / "model_config.json").extra["prompt"] == recorded
    assert load_model(tmp_path / "full").prompt_format == recorded  # what generate/full.py generates in
    assert load_adapter(load_model(checkpoint), tmp_path / "adapter" / "lit_adapter_finetuned.pth").prompt_format == recorded
