"""Several devices through Fabric's own strategies, on CPU: 2 processes with DDP over gloo."""

import subprocess
import sys
from pathlib import Path

import torch

from lit_lora.data import prepare
from lit_lora.lora import read_lora_file
from tests.conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_lora(checkpoint_dir, data_dir, out_dir, devices):
    command = [sys.executable, str(ROOT / "finetune" / "lora.py"), "--checkpoint_dir", str(checkpoint_dir),
               "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--devices", str(devices),
               "--precision", "32-true", "--global_batch_size", "8", "--micro_batch_size", "2", "--max_steps", "3",
               "--learning_rate", "1e-2", "--warmup_steps", "1", "--lora_dropout", "0", "--lora_targets", "[q,v,head]",
               "--eval_interval", "0", "--eval_examples", "4", "--eval_max_new_tokens", "2", "--save_interval", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_two_processes_end_with_the_weights_of_one(tmp_path, tokenizer_path, tokenizer):
    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    records = [{"instruction": "Repeat the word.", "input": w, "output": w}
               for w in ["cat", "dog", "sun", "tree", "lamp", "river", "stone", "cloud", "bird", "fish"]] * 2
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=4)

    one = run_lora(checkpoint_dir, tmp_path / "data", tmp_path / "one", devices=1)
    two = run_lora(checkpoint_dir, tmp_path / "data", tmp_path / "two", devices=2)
    # the same global batch: 4 micro batches of 2 on one device, 2 on each of two
    assert "(4 micro batches of 2 on each of 1 devices)" in one
    assert "(2 micro batches of 2 on each of 2 devices)" in two
    assert two.count("step 3/3 |") == 1  # only rank 0 prints
    a = read_lora_file(tmp_path / "one" / "lit_lora_finetuned.pth")["lora"]
    b = read_lora_file(tmp_path / "two" / "lit_lora_finetuned.pth")["lora"]
    assert set(a) == set(b) and all((a[k] - b[k]).abs().max().item() < 1e-5 for k in a)
    assert not torch.equal(a["lm_head.lora_B"], torch.zeros_like(a["lm_head.lora_B"]))  # it did train
    assert (tmp_path / "two" / "step-000002" / "lit_lora_finetuned.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "two").glob("*.tmp")) == []  # no half-written files from either rank


def test_full_finetuning_on_two_processes_saves_a_folder_that_loads_on_one(tmp_path, tokenizer_path, tokenizer):
    """On GPUs full finetuning shards with FSDP; on CPU processes (Fabric's FSDP needs GPUs) it replicates
    with DDP. Either way rank 0 writes one ordinary checkpoint folder from the gathered weights."""
    from lit_lora.utils import load_model

    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    records = [{"instruction": "Say it.", "input": "", "output": w} for w in ["cat", "dog", "sun", "tree"]] * 3
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=4)
    command = [sys.executable, str(ROOT / "finetune" / "full.py"), "--checkpoint_dir", str(checkpoint_dir),
               "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "full"), "--devices", "2",
               "--precision", "32-true", "--global_batch_size", "4", "--micro_batch_size", "2", "--max_steps", "2",
               "--learning_rate", "1e-2", "--warmup_steps", "1", "--eval_interval", "0", "--eval_examples", "2",
               "--eval_max_new_tokens", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained, base = load_model(tmp_path / "full"), load_model(checkpoint_dir)
    changed = [name for name, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert len(changed) == len(base.state_dict())  # every weight trained, and all of them were saved
