"""Damaged and hostile files, full disks, two runs at once, the end of a run: each ends in one line that names the
file and what to do (exit 1, or 2 for a flag), writes nothing half, and never exits 0 with garbage.

Every case runs the script as a user types it (conftest.run_command), on a micro model the test builds.
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_lora.checkpoint import load_model
from lit_lora.convert.hf import export_hf_checkpoint
from lit_lora.convert.peft import export_peft_adapter
from lit_lora.lora import apply_lora
from lit_lora.method_files import save_lora
from tests.conftest import ROOT, lora_args, make_checkpoint, run_command


def one_line_error(script: str, *args, words: tuple = (), code: int = 1) -> str:
    """Run the script; it must end with exit `code` and exactly one line on stderr, `error: ...`, holding `words`."""
    exit_code, _, err = run_command(script, *args)
    lines = err.strip().splitlines()
    assert exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


class RunsCode:
    """A pickle that would run code when loaded by a plain torch.load (here: print)."""

    def __reduce__(self):
        return (print, ("this ran",))


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def huge_header(path: Path) -> Path:
    """A safetensors file whose first 8 bytes (the header's length) say 2**60."""
    path.write_bytes(struct.pack("<Q", 2**60) + path.read_bytes()[8:])
    return path


def edit_json(path: Path, edit) -> Path:
    content = json.loads(path.read_text())
    path.write_text(json.dumps(edit(content)))
    return path


@pytest.fixture
def base(tmp_path, tokenizer_path) -> Path:
    return make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)


@pytest.fixture
def hf_dir(tmp_path, base) -> Path:
    export_hf_checkpoint(base, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def peft_dir(tmp_path, base) -> Path:
    save_lora(apply_lora(load_model(base), r=2, targets=("q", "v")), tmp_path / "lora.pth")
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft", checkpoint_dir=base, base_model_name_or_path="x")
    return tmp_path / "peft"


# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders (convert_hf.py)


def write_bin(path: Path, content) -> None:
    path.parent.joinpath("model.safetensors").unlink(missing_ok=True)
    torch.save(content, path)


HF_DAMAGE = {
    "a pickle that runs code": (lambda d: write_bin(d / "pytorch_model.bin", {"w": RunsCode()}),
                                ["pytorch_model.bin", "never loaded"]),
    "a truncated pytorch_model.bin": (lambda d: (write_bin(d / "pytorch_model.bin", load_model(d.parent / "base").state_dict()),
                                                 truncate(d / "pytorch_model.bin")), ["pytorch_model.bin cannot be read"]),
    "a truncated model.safetensors": (lambda d: truncate(d / "model.safetensors"),
                                      ["model.safetensors cannot be read as a safetensors file"]),
    "a header of 2**60 bytes": (lambda d: huge_header(d / "model.safetensors"), ["model.safetensors cannot be read"]),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json holds a JSON list"]),
    "config.json a number": (lambda d: (d / "config.json").write_text("7"), ["config.json holds a JSON int"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{'a': 1"), ["config.json is not valid JSON"]),
    "rope_scaling a string": (lambda d: edit_json(d / "config.json", lambda c: {**c, "rope_scaling": "llama3"}),
                              ["rope_scaling = \"llama3\" is not supported"]),
    "num_hidden_layers a string": (lambda d: edit_json(d / "config.json", lambda c: {**c, "num_hidden_layers": "4"}),
                                   ["num_hidden_layers is '4'"]),
    "rms_norm_eps NaN": (lambda d: edit_json(d / "config.json", lambda c: {**c, "rms_norm_eps": float("nan")}),
                         ["rms_norm_eps is nan"]),
    "rope_theta -1": (lambda d: edit_json(d / "config.json", lambda c: {**c, "rope_theta": -1}), ["rope_theta is -1"]),
    "llama3 factor -8": (lambda d: edit_json(d / "config.json", lambda c: {**c, "rope_scaling": {
        "rope_type": "llama3", "factor": -8, "low_freq_factor": 1, "high_freq_factor": 4,
        "original_max_position_embeddings": 64}}), ["rope_scaling's factor is -8"]),
    "a NaN weight": (lambda d: nan_in_safetensors(d / "model.safetensors"), ["holds NaN or infinite values"]),
    "a truncated tokenizer.model": (lambda d: truncate(d / "tokenizer.model"),
                                    ["tokenizer.model cannot be read as a SentencePiece"]),
    "a link out of the folder": (lambda d: link_out(d / "model.safetensors"), ["is a link to", "outside"]),
}


def nan_in_safetensors(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(path))


def link_out(path: Path) -> None:
    elsewhere = path.parent.parent / "elsewhere"
    elsewhere.mkdir()
    path.rename(elsewhere / path.name)
    path.symlink_to(elsewhere / path.name)


@pytest.mark.parametrize("damage", HF_DAMAGE)
def test_a_damaged_hugging_face_folder_is_one_line_and_writes_nothing(tmp_path, hf_dir, damage):
    make_damage, words = HF_DAMAGE[damage]
    make_damage(hf_dir)
    one_line_error("checkpoints/convert_hf.py", "--hf_dir", hf_dir, "--output_dir", tmp_path / "out", words=words)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_hugging_face_cache_links_into_the_same_repository_are_followed(tmp_path, hf_dir):
    """A snapshot of Hugging Face's cache is links into the repository's blobs/: allowed, and converted."""
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in hf_dir.iterdir():
        file.rename(repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    code, out, err = run_command("checkpoints/convert_hf.py", "--hf_dir", snapshot, "--output_dir", tmp_path / "lit")
    assert code == 0, err
    assert load_model(tmp_path / "lit").config.n_layer == 2


# ---------------------------------------------------------------------------------------------------------
# PEFT adapters (import_peft.py)


def peft_bin(d: Path, content) -> None:
    (d / "adapter_model.safetensors").unlink()
    torch.save(content, d / "adapter_model.bin")


def edit_peft_tensors(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"))


PEFT_DAMAGE = {
    "a pickle that runs code": (lambda d: peft_bin(d, {"w": RunsCode()}), ["adapter_model.bin", "never loaded"]),
    "a truncated .bin": (lambda d: (peft_bin(d, {"w": torch.zeros(1000)}), truncate(d / "adapter_model.bin")),
                         ["adapter_model.bin cannot be read"]),
    "a truncated .safetensors": (lambda d: truncate(d / "adapter_model.safetensors"),
                                 ["adapter_model.safetensors cannot be read as a safetensors file"]),
    "a header of 2**60 bytes": (lambda d: huge_header(d / "adapter_model.safetensors"), ["cannot be read"]),
    "adapter_config.json a list": (lambda d: (d / "adapter_config.json").write_text("[]"), ["holds a JSON list"]),
    "adapter_config.json not JSON": (lambda d: (d / "adapter_config.json").write_text("{"),
                                     ["adapter_config.json is not valid JSON"]),
    "r a string": (lambda d: edit_json(d / "adapter_config.json", lambda c: {**c, "r": "8"}), ["r is '8'"]),
    "lora_alpha NaN": (lambda d: edit_json(d / "adapter_config.json", lambda c: {**c, "lora_alpha": float("nan")}),
                       ["lora_alpha is nan"]),
    "int32 tensors": (lambda d: edit_peft_tensors(d, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()})),
                      ["holds torch.int32"]),
    "a NaN tensor": (lambda d: edit_peft_tensors(d, lambda t: next(iter(t.values())).fill_(float("nan"))),
                     ["holds NaN or infinite values"]),
}


@pytest.mark.parametrize("damage", PEFT_DAMAGE)
def test_a_damaged_peft_adapter_is_one_line_and_writes_nothing(tmp_path, base, peft_dir, damage):
    make_damage, words = PEFT_DAMAGE[damage]
    make_damage(peft_dir)
    one_line_error("checkpoints/import_peft.py", "--peft_dir", peft_dir, "--checkpoint_dir", base,
                   "--output_path", tmp_path / "imported.pth", words=words)
    assert not (tmp_path / "imported.pth").exists()


# ---------------------------------------------------------------------------------------------------------
# Prepared data and finetuning (finetune/lora.py)


def edit_records(path: Path, edit) -> None:
    records = torch.load(path, weights_only=True)
    torch.save(edit(records), path)


def set_(record: dict, key: str, value) -> list:
    record[key] = value
    return record


PREPARED_DAMAGE = {
    "a pickle that runs code": (lambda d: torch.save([RunsCode()], d / "train.pt"), ["train.pt", "never loaded"]),
    "train.pt cut in half": (lambda d: truncate(d / "train.pt"), ["train.pt cannot be read"]),
    "train.pt empty": (lambda d: torch.save([], d / "train.pt"), ["train.pt holds no examples"]),
    "a record without labels": (lambda d: edit_records(d / "train.pt", lambda r: [{"input_ids": r[0]["input_ids"]}, *r[1:]]),
                                ["train.pt, record 0: expected input_ids and labels"]),
    "labels shorter than input_ids": (lambda d: edit_records(d / "train.pt", lambda r: [
        set_(r[0], "labels", r[0]["labels"][:-1]), *r[1:]]), ["record 0: input_ids and labels differ in length"]),
    "a token id beyond the vocabulary": (lambda d: edit_records(d / "train.pt", lambda r: [*r[:3], set_(
        r[3], "input_ids", r[3]["input_ids"] + 5000), *r[4:]]), ["record 3: a token id is outside the vocabulary"]),
    "a negative token id": (lambda d: edit_records(d / "train.pt", lambda r: [*r[:-1], set_(
        r[-1], "input_ids", -r[-1]["input_ids"])]), ["a token id is outside the vocabulary"]),
    "prepare_config.json without the checksum": (lambda d: edit_json(d / "prepare_config.json", lambda c: {
        k: v for k, v in c.items() if k != "tokenizer_checksum"}), ["tokenizer_checksum is None"]),
    "prepare_config.json a list": (lambda d: (d / "prepare_config.json").write_text("[]"),
                                   ["prepare_config.json holds a JSON list"]),
    "a number of 5000 digits": (lambda d: (d / "prepare_config.json").write_text('{"seed": ' + "9" * 5000 + "}"),
                                ["prepare_config.json is not a JSON file lit-lora can read: it holds a number of "
                                 "thousands of digits"]),
    "every label masked": (lambda d: edit_records(d / "train.pt", lambda r: [set_(e, "labels", torch.full_like(
        e["labels"], -100)) for e in r]), ["has a label token: every label is -100"]),
}


@pytest.mark.parametrize("damage", PREPARED_DAMAGE)
def test_damaged_prepared_data_is_named_when_it_is_loaded(setup, damage):
    """Every record is checked when the data are loaded, not when an example is sampled hours later."""
    checkpoint_dir, data_dir, tmp_path = setup
    make_damage, words = PREPARED_DAMAGE[damage]
    make_damage(data_dir)
    one_line_error("finetune/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                   "--out_dir", tmp_path / "out", "--precision", "32-true", words=words)
    assert not (tmp_path / "out" / "lit_lora_finetuned.pth").exists()


def test_flags_the_parser_or_the_model_refuse_are_one_line(setup):
    checkpoint_dir, data_dir, tmp_path = setup
    common = ["--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", tmp_path / "out"]
    one_line_error("finetune/lora.py", *common, "--max_seq_length", "abc", code=2,
                   words=["--max_seq_length abc: expected a whole number or null (--help lists every flag)"])
    one_line_error("finetune/lora.py", *common, "--precision", "64-true", code=2, words=["--precision 64-true"])
    one_line_error("finetune/lora.py", *common, "--lora_r", "1000000000",
                   words=["--lora_r 1000000000: must be at most 16"])
    one_line_error("checkpoints/convert_hf.py", "--hf_dir", tmp_path, "--dtype", "float64", code=2,
                   words=["--dtype float64: expected one of float32, float16, bfloat16 or null"])


def test_resuming_the_state_of_another_method_says_which_script_wrote_it(setup):
    from finetune.full import FullArgs
    from finetune.full import main as full

    checkpoint_dir, data_dir, tmp_path = setup
    full(FullArgs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "full", precision="32-true",
                  global_batch_size=8, micro_batch_size=8, max_steps=1, eval_interval=0, eval_max_new_tokens=0))
    one_line_error("finetune/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                   "--out_dir", tmp_path / "lora", "--resume", tmp_path / "full" / "state.pth",
                   "--global_batch_size", "8", "--max_steps", "1",
                   words=["the state was written by finetune/full.py, not by finetune/lora.py"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folders (every script that loads one: generate/base.py here)


def bad_weights(d: Path, edit) -> None:
    state = torch.load(d / "lit_model.pth", weights_only=True)
    edit(state)
    torch.save(state, d / "lit_model.pth")


CHECKPOINT_DAMAGE = {
    "n_layer 2.5": (lambda d: edit_json(d / "model_config.json", lambda c: {**c, "n_layer": 2.5}),
                    ["model_config.json: n_layer is 2.5: must be a whole number"]),
    "model_config.json not JSON": (lambda d: (d / "model_config.json").write_text('{"n_layer": 2,}'),
                                   ["model_config.json is not valid JSON"]),
    "an int64 tensor": (lambda d: bad_weights(d, lambda s: s.update({"norm.weight": s["norm.weight"].long()})),
                        ["norm.weight holds torch.int64"]),
    "a flipped bit": (lambda d: flip_a_bit(d / "lit_model.pth"), ["lit_model.pth is not the file that was written"]),
    "NaN weights, no checksum": (lambda d: ((d / "checksums.json").unlink(), bad_weights(
        d, lambda s: s["norm.weight"].fill_(float("nan")))), ["norm.weight holds NaN or infinite values"]),
    "a truncated tokenizer.model": (lambda d: truncate(d / "tokenizer.model"), ["tokenizer.model cannot be read"]),
    "a link out of the folder": (lambda d: link_out(d / "lit_model.pth"), ["is a link to"]),
}


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0x01  # inside the last tensor's data: the file still loads
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_folder_is_one_line(base, damage):
    make_damage, words = CHECKPOINT_DAMAGE[damage]
    make_damage(base)
    one_line_error("generate/base.py", "--checkpoint_dir", base, "--max_new_tokens", "3", words=words)


def test_a_vanishing_temperature_generates_the_greedy_text(base):
    texts = {}
    for temperature in ("0", "1e-39", "1e-300", "5e-324"):
        code, out, err = run_command("generate/base.py", "--checkpoint_dir", base, "--prompt", "The model",
                                     "--max_new_tokens", "8", "--temperature", temperature)
        assert code == 0, err
        texts[temperature] = out
    assert len(set(texts.values())) == 1


def test_a_damaged_lora_file_given_to_generate_is_one_line(tmp_path, base):
    (tmp_path / "empty.pth").write_bytes(b"")
    one_line_error("generate/lora.py", "--checkpoint_dir", base, "--lora_path", tmp_path / "empty.pth",
                   words=["empty.pth cannot be read as a LoRA file"])


def test_export_to_a_file_says_so(tmp_path, base):
    (tmp_path / "a_file").write_text("x")
    one_line_error("checkpoints/export_hf.py", "--checkpoint_dir", base, "--output_dir", tmp_path / "a_file",
                   words=[f"{tmp_path / 'a_file'} is a file, not a folder"])


def test_a_data_file_nested_too_deeply_is_one_line(tmp_path, base):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error("prepare_data/json_data.py", "--data_file", tmp_path / "deep.json", "--checkpoint_dir", base,
                   "--destination_path", tmp_path / "data", words=["deep.json", "nested too deeply"])


def test_prepare_scripts_check_the_tokenizer_before_downloading(tmp_path, monkeypatch):
    import lit_lora.data_files as data_files

    def no_download(url, path):
        raise AssertionError("downloaded before the tokenizer was checked")

    monkeypatch.setattr(data_files, "download", no_download)
    for script in ("prepare_data/alpaca.py", "prepare_data/dolly.py"):
        one_line_error(script, "--checkpoint_dir", tmp_path / "missing", "--destination_path", tmp_path / "d",
                       words=["No tokenizer at", "missing"])


# ---------------------------------------------------------------------------------------------------------
# Full disks


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KB file system (tmpfs), where there is the permission to mount one; else the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip() or 'no permission'})")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)  # --lazy: even while a file is still open


def test_a_full_disk_is_said_as_such_and_leaves_nothing_half_written(tmp_path, tiny_disk, setup, hf_dir):
    checkpoint_dir, data_dir, _ = setup
    records = [{"instruction": f"Repeat the number {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(3000)]
    (tmp_path / "many.json").write_text(json.dumps(records))
    cases = [
        ("prepare_data/json_data.py", "--data_file", tmp_path / "many.json", "--checkpoint_dir", checkpoint_dir,
         "--destination_path", tiny_disk / "data"),
        ("checkpoints/convert_hf.py", "--hf_dir", hf_dir, "--output_dir", tiny_disk / "lit"),
        ("checkpoints/export_hf.py", "--checkpoint_dir", checkpoint_dir, "--output_dir", tiny_disk / "hf"),
        ("finetune/full.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir",
         tiny_disk / "full", "--max_steps", "1", "--global_batch_size", "8", "--precision", "32-true",
         "--eval_max_new_tokens", "0"),
    ]
    for script, *args in cases:
        line = one_line_error(script, *args, words=["No space left on device writing", str(tiny_disk)])
        assert ".tmp" not in line
        assert not [p for p in tiny_disk.rglob("*") if p.is_file() and p.suffix in (".pth", ".pt", ".safetensors")], line


# ---------------------------------------------------------------------------------------------------------
# Two runs at once, and the end of a run


def test_a_second_run_into_the_same_out_dir_is_refused_and_a_dead_ones_lock_is_taken_over(setup):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from lit_lora.resume import lock_out_dir; lock_out_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(out_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = lora_args(checkpoint_dir, data_dir, out_dir, max_steps=1, eval_interval=0, eval_max_new_tokens=0)
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {holder.pid}, which holds "):
            main(args)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main(args)  # its lock died with it
    assert (out_dir / "lit_lora_finetuned.pth").is_file()
    taker = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from lit_lora.resume import lock_out_dir; lock_out_dir(Path(sys.argv[1]))", str(out_dir)],
                           cwd=ROOT, capture_output=True, text=True)
    assert taker.returncode == 0, taker.stderr  # the finished run released it


def test_ctrl_c_in_the_final_evaluation_saves_the_last_step_and_resume_finishes_the_run(setup, monkeypatch):
    import lit_lora.train as train
    from finetune.lora import main
    from tests.conftest import interrupt_at, weights

    checkpoint_dir, data_dir, tmp_path = setup
    run = dict(max_steps=3, eval_interval=0, save_interval=0, lora_dropout=0.0, eval_max_new_tokens=2)
    main(lora_args(checkpoint_dir, data_dir, tmp_path / "straight", **run))
    real = interrupt_at(monkeypatch, train, "evaluate", 1)  # the final evaluation is the only one
    with pytest.raises(SystemExit) as exit_info:
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "cut", **run))
    assert exit_info.value.code == 130
    assert torch.load(tmp_path / "cut" / "state.pth", weights_only=True)["step"] == 3  # no step lost
    monkeypatch.setattr(train, "evaluate", real)
    resumed = main(lora_args(checkpoint_dir, data_dir, tmp_path / "cut", resume="auto", **run))
    assert resumed["steps"] == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_after_main_returns_a_ctrl_c_is_ignored(monkeypatch):
    """Once a script's work is written, Ctrl-C while Python shuts down would only kill it by the signal or end it
    in a traceback: cli() ignores SIGINT from then on."""
    from dataclasses import dataclass

    from lit_lora.cli import cli

    @dataclass
    class NoFlags:
        pass

    monkeypatch.setattr("sys.argv", ["script.py"])
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert cli(lambda args: "done", NoFlags) == "done"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_busy_machine_is_said_at_the_start_and_progress_shows_after_the_first_step(setup, monkeypatch, capsys):
    import lit_lora.devices as devices
    from finetune.lora import main

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another program keeps a core busy
    try:
        assert devices.cores_busy_elsewhere(seconds=1.0) >= 0.8
    finally:
        spinner.kill()
        spinner.wait()
    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda: 1.6)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    warning = devices.busy_machine_warning()
    assert "other programs keep 1.6 of this machine's 2 cores busy" in warning and "OMP_NUM_THREADS=1" in warning
    checkpoint_dir, data_dir, tmp_path = setup
    main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=3, log_interval=100, eval_interval=0))
    out = capsys.readouterr().out
    assert warning.strip() in out
    assert re.search(r"^step 1/3 \| loss", out, re.M) and re.search(r"^step 3/3 \| loss", out, re.M)
