"""Several devices through Fabric, on CPU: 2 processes over gloo, with DDP (replicas) and FSDP (torch's
`fully_shard`, sharding every Block). Each run is a real `python finetune/*.py --devices N` subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_lora.data import prepare
from lit_lora.method_files import read_lora_file
from tests.conftest import hidden_leftovers, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "sun", "tree", "lamp", "river", "stone", "cloud", "bird", "fish"]

# A Ctrl-C at the second save (after step 2 of 3) on every process, for the resume tests: Python imports
# sitecustomize at start-up in each process that Fabric starts, and this one patches the training loop.
INTERRUPT_AT_SECOND_SAVE = """
import lit_lora.train as train
real, calls = train.save_checkpoint, {"n": 0}
def save_checkpoint(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
train.save_checkpoint = save_checkpoint
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, tokenizer):
    tmp_path = tmp_path_factory.mktemp("multi_device")
    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    records = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS] * 2
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=4)
    return checkpoint_dir, tmp_path / "data", tmp_path


def run(script, checkpoint_dir, data_dir, out_dir, devices, *flags, interrupt=False, expect=0):
    command = [str(ROOT / "finetune" / script), "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir),
               "--out_dir", str(out_dir), "--devices", str(devices), "--precision", "32-true",
               "--global_batch_size", "8", "--micro_batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "1",
               "--eval_interval", "0", "--eval_examples", "4", "--eval_max_new_tokens", "2", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine: one thread each
    if interrupt:
        (out_dir.parent / "interrupt").mkdir(exist_ok=True)
        (out_dir.parent / "interrupt" / "sitecustomize.py").write_text(INTERRUPT_AT_SECOND_SAVE)
        env["PYTHONPATH"] = os.pathsep.join([str(out_dir.parent / "interrupt"), str(ROOT)])
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


# Saving after every step: a resume test's interrupted run has saved step 1 when the Ctrl-C comes at step 2's save.
# Without dropout (one process and two draw different masks), so that one device and two end with equal weights.
LORA = ["--max_steps", "3", "--lora_targets", "[q,v,head]", "--save_interval", "1"]
NO_DROPOUT = ["--lora_dropout", "0"]


@pytest.fixture(scope="module")
def one_device_lora(setup):
    checkpoint_dir, data_dir, tmp_path = setup
    output = run("lora.py", checkpoint_dir, data_dir, tmp_path / "one", 1, *LORA, *NO_DROPOUT)
    assert "(4 micro batches of 2 on each of 1 devices)" in output
    return read_lora_file(tmp_path / "one" / "lit_lora_finetuned.pth")["lora"]


@pytest.fixture(scope="module")
def two_process_lora(setup):
    """The two-process LoRA run of each strategy without dropout, run once for the module: the equality test checks
    it, and the FSDP resume test (the same flags) compares its resumed run with it."""
    checkpoint_dir, data_dir, tmp_path = setup
    outputs = {}

    def run_once(strategy: str) -> tuple[Path, str]:
        out_dir = tmp_path / f"two_{strategy}"
        if strategy not in outputs:
            outputs[strategy] = run("lora.py", checkpoint_dir, data_dir, out_dir, 2, *LORA, *NO_DROPOUT,
                                    "--strategy", strategy)
        return out_dir, outputs[strategy]

    return run_once


def close(a: dict, b: dict, tolerance: float = 1e-5) -> bool:
    return set(a) == set(b) and all((a[k].float() - b[k].float()).abs().max().item() < tolerance for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_processes_ends_with_the_weights_of_one(one_device_lora, two_process_lora, strategy):
    out_dir, output = two_process_lora(strategy)
    # the same global batch: 4 micro batches of 2 on one device, 2 on each of two
    assert "(2 micro batches of 2 on each of 2 devices)" in output
    assert output.count("step 3/3 |") == 1  # only rank 0 prints
    two = read_lora_file(out_dir / "lit_lora_finetuned.pth")["lora"]
    assert close(one_device_lora, two)
    assert not torch.equal(two["lm_head.lora_B"], torch.zeros_like(two["lm_head.lora_B"]))  # it did train
    assert (out_dir / "step-000002" / "lit_lora_finetuned.pth").is_file()
    assert not hidden_leftovers(out_dir), "half-written files from a rank"


def test_full_finetuning_sharded_on_two_processes_ends_with_the_weights_of_one(setup):
    """Full finetuning on several devices shards with FSDP (fully_shard per Block), on CPU processes as on GPUs;
    rank 0 writes one ordinary checkpoint folder from the gathered weights, which loads on one device."""
    from lit_lora.checkpoint import load_model

    checkpoint_dir, data_dir, tmp_path = setup
    flags = ["--max_steps", "2", "--learning_rate", "1e-3"]
    run("full.py", checkpoint_dir, data_dir, tmp_path / "full_one", 1, *flags)
    output = run("full.py", checkpoint_dir, data_dir, tmp_path / "full_two", 2, *flags)
    assert "(2 micro batches of 2 on each of 2 devices)" in output
    one, two = load_model(tmp_path / "full_one").state_dict(), load_model(tmp_path / "full_two").state_dict()
    base = load_model(checkpoint_dir).state_dict()
    assert close(one, two)
    assert all(not torch.equal(two[name], base[name]) for name in base)  # every weight trained, and was saved


@pytest.mark.parametrize("strategy,dropout", [
    ("ddp", "0.2"),  # each process draws its own dropout masks; all are redrawn on resume
    ("fsdp", "0"),  # an interrupt saves nothing under FSDP: resume from the step-1 save
])
def test_interrupted_two_process_run_resumes_exactly(setup, two_process_lora, strategy, dropout):
    checkpoint_dir, data_dir, tmp_path = setup
    common = [*LORA, "--lora_dropout", dropout, "--strategy", strategy]
    if dropout == "0":  # the flags of the equality test's run: that run is the uninterrupted one
        straight, _ = two_process_lora(strategy)
    else:
        straight = tmp_path / f"straight_{strategy}"
        run("lora.py", checkpoint_dir, data_dir, straight, 2, *common)
    out_dir = tmp_path / f"resumed_{strategy}"
    run("lora.py", checkpoint_dir, data_dir, out_dir, 2, *common, interrupt=True, expect=130)
    saved_step = torch.load(out_dir / "state.pth", weights_only=True)["step"]
    assert saved_step == (2 if strategy == "ddp" else 1)  # DDP saves on the interrupt; FSDP has its last save
    output = run("lora.py", checkpoint_dir, data_dir, out_dir, 2, *common, "--resume", "auto")
    assert f"Resumed from {out_dir / 'state.pth'} after step {saved_step}" in output
    a = read_lora_file(straight / "lit_lora_finetuned.pth")["lora"]
    b = read_lora_file(out_dir / "lit_lora_finetuned.pth")["lora"]
    assert all(torch.equal(a[name], b[name]) for name in a)
