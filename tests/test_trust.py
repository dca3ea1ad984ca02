"""Issue 32's defects in the course's periphery, each run as a user types it: a rerun after Ctrl-C, a mistyped flag,
a Hugging Face folder or a missing relative path given as the checkpoint, a recorded prompt format that is not one,
a GGUF or safetensors file given as a LoRA file, and LoRA merged in the run's dtype."""

import json
import re
import struct

import pytest
import torch

import finetune.lora
from lit_lora.checkpoint import PROMPT_STYLE_NAMES, load_model
from lit_lora.lora import apply_lora
from lit_lora.method_files import read_lora_file, save_lora
from lit_lora.prompts import PROMPT_STYLES
from tests.conftest import interrupt_at, lora_args, make_checkpoint, run_command

FLAGS = ["--precision", "32-true", "--global_batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4",
         "--save_interval", "2", "--eval_interval", "0", "--eval_max_new_tokens", "0", "--lora_r", "2"]


def finetune_command(checkpoint_dir, data_dir, out_dir, *extra):
    return run_command("finetune/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                       "--out_dir", out_dir, *FLAGS, *extra)


def test_a_rerun_after_ctrl_c_never_discards_the_saved_steps(setup, monkeypatch):
    checkpoint_dir, data_dir, tmp_path = setup
    out_dir = tmp_path / "out"
    interrupt_at(monkeypatch, __import__("lit_lora.train").train, "loss_sum", 6)  # Ctrl-C in step 3 (2 per step)
    code, _, _ = finetune_command(checkpoint_dir, data_dir, out_dir)
    assert code == 130
    monkeypatch.undo()
    saved = (out_dir / "state.pth").read_bytes()

    code, _, err = finetune_command(checkpoint_dir, data_dir, out_dir)  # the same command again, as typed
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out_dir} holds the resumable state of an earlier run" in err and "after step 2" in err
    assert "--resume auto" in err and "--overwrite true" in err
    assert (out_dir / "state.pth").read_bytes() == saved  # nothing touched

    code, out, _ = finetune_command(checkpoint_dir, data_dir, out_dir, "--resume", "auto")
    assert code == 0 and "Resumed from" in out and "after step 2" in out
    code, out, _ = finetune_command(checkpoint_dir, data_dir, out_dir, "--overwrite", "true")
    assert code == 0 and "Resumed" not in out
    code, _, err = finetune_command(checkpoint_dir, data_dir, out_dir, "--overwrite", "true", "--resume", "auto")
    assert code == 2 and "--overwrite True: cannot go with --resume" in err


def test_resuming_with_another_micro_batch_size_says_it_is_not_bit_for_bit(setup, monkeypatch, capsys):
    checkpoint_dir, data_dir, tmp_path = setup
    interrupt_at(monkeypatch, __import__("lit_lora.train").train, "loss_sum", 6)
    with pytest.raises(SystemExit):
        finetune.lora.main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=4, save_interval=2,
                                     eval_interval=0, eval_max_new_tokens=0))
    monkeypatch.undo()
    capsys.readouterr()
    finetune.lora.main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=4, save_interval=2,
                                 eval_interval=0, eval_max_new_tokens=0, micro_batch_size=2, resume="auto"))
    out = capsys.readouterr().out
    assert "Note: --micro_batch_size 2 (saved: 4): the run goes on, but not bit for bit" in out


@pytest.mark.parametrize("script, typed, meant", [
    ("finetune/lora.py", "--max_step", "--max_steps"),
    ("generate/base.py", "--temperatur", "--temperature"),
    ("prepare_data/alpaca.py", "--max_seq_len", "--max_seq_length"),
])
def test_an_abbreviated_or_mistyped_flag_is_refused_and_the_right_one_named(script, typed, meant):
    code, _, err = run_command(script, typed, "10")
    assert code == 2 and err.strip() == f"error: unknown flag(s): {typed} (did you mean {meant}?) (--help lists every flag)"


def test_a_hugging_face_folder_or_a_missing_relative_path_as_checkpoint_says_what_it_is(tmp_path, monkeypatch):
    hf = tmp_path / "SmolLM2-135M-Instruct"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0" * 16)
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", hf)
    assert code == 1 and "is a Hugging Face model folder" in err
    assert f"python checkpoints/convert_hf.py --hf_dir {hf}" in err

    monkeypatch.chdir(tmp_path)
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", "checkpoints/nowhere")
    assert code == 1 and f"does not exist (relative to the working directory {tmp_path})" in err

    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    code, _, err = run_command("generate/base.py", "--checkpoint_dir", tmp_path / "model.gguf")
    assert code == 1 and "is a GGUF file, not a checkpoint folder" in err and "convert_gguf.py" in err


def test_the_core_knows_every_prompt_style():
    assert set(PROMPT_STYLE_NAMES) == set(PROMPT_STYLES)


BAD_FORMATS = [
    ({"style": "alpacca", "system_prompt": None}, "style is 'alpacca': must be one of alpaca"),
    ({"style": 5}, "style is 5: must be one of"),
    ({"style": "chatml", "system_prompt": ["be", "nice"]}, "system_prompt is ['be', 'nice']: must be null or text"),
    ({"style": "chatml", "system_prompt": "caf\udce9"}, "system_prompt is 'caf\\udce9': must be null or text"),
    ({"style": "chat_template", "chat_template_sha256": "not-hex"}, "chat_template_sha256 is 'not-hex': must be null or 64 hex"),
    ("alpaca", "must be null or an object with style"),
    ({"style": "alpaca", "extra_key": 1}, "must be null or an object with style"),
]


@pytest.mark.parametrize("prompt_format, words", BAD_FORMATS)
def test_a_recorded_prompt_format_is_checked_on_load_and_named_with_its_file(tmp_path, tokenizer_path, prompt_format,
                                                                            words):
    checkpoint = make_checkpoint(tmp_path / "base", tokenizer_path)
    model = apply_lora(load_model(checkpoint), r=2)
    model.prompt_format = prompt_format
    save_lora(model, tmp_path / "lora.pth")
    code, _, err = run_command("generate/lora.py", "--checkpoint_dir", checkpoint, "--lora_path", tmp_path / "lora.pth")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{tmp_path / 'lora.pth'}: the recorded prompt format's prompt" in err and words in err

    config = json.loads((checkpoint / "model_config.json").read_text())
    config["extra"] = {"prompt": prompt_format}
    (checkpoint / "model_config.json").write_text(json.dumps(config))
    code, _, err = run_command("generate/full.py", "--checkpoint_dir", checkpoint)
    assert code == 1 and f"{checkpoint / 'model_config.json'}: extra.prompt" in err and words in err


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_a_gguf_or_safetensors_file_as_lora_path_is_named_as_what_it_is(tmp_path, checkpoint_dir, kind):
    path = tmp_path / f"model.{kind}"
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 16 if kind == "gguf" else struct.pack("<Q", len(header)) + header + b"\0" * 4)
    code, _, err = run_command("generate/lora.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", path)
    assert code == 1 and err.count("\n") == 1, err
    expected = "is a GGUF file (llama.cpp's format), not a LoRA file" if kind == "gguf" else \
        "is a safetensors file (Hugging Face's format), not a LoRA file"
    assert f"{path} {expected}" in err
    assert ("convert_gguf.py" if kind == "gguf" else "import_peft.py") in err


def test_lora_is_merged_after_the_cast_in_fp32_rounding_once(tmp_path, tokenizer_path):
    """A half-precision checkpoint generated in fp32: W = fp32(W0) + dW, not W0 + dW rounded to fp16 first."""
    from lit_lora.chat import prepare_for_generation

    checkpoint = make_checkpoint(tmp_path / "base", tokenizer_path)
    state = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    torch.save({k: v.half() for k, v in state.items()}, checkpoint / "lit_model.pth")
    (checkpoint / "checksums.json").unlink(missing_ok=True)
    model = apply_lora(load_model(checkpoint), r=2)
    layer = model.blocks[0].attn.q_proj
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    expected = layer.weight.float() + (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
    model = prepare_for_generation(model, "32-true", fused=False, merge=True)
    assert layer.merged and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, expected)
    assert not torch.equal(layer.weight, expected.half().float())  # what merging before the cast gave
