import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import lit_lora.train as train_module
from lit_lora.data import global_batch_indices, prepare
from lit_lora.method_files import read_lora_file
from lit_lora.train import learning_rate_at
from tests.conftest import (
    INTERRUPTS,
    WORDS,
    hidden_leftovers,
    interrupt_at,
    logged,
    lora_args,
    make_checkpoint,
    make_setup,
    weights,
)


def test_schedule_warms_up_then_decays_to_min_lr():
    lrs = [learning_rate_at(step, 1.0, warmup_steps=4, max_steps=20, min_lr=0.1) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone cosine decay
    assert learning_rate_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)


def test_loss_sum_equals_cross_entropy_over_all_logits():
    """Computing logits only where a label is must give the loss of the full computation."""
    from lit_lora.model import Config, LLaMA

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro"))
    input_ids = torch.randint(0, 256, (3, 12))
    labels = input_ids.clone()
    labels[0, :5], labels[1, :9], labels[2, 7:] = -100, -100, -100  # prompts masked, right padding
    logits = model(input_ids)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    assert train_module.loss_sum(model, input_ids, labels).item() == pytest.approx(reference.item(), rel=1e-6)


def test_each_epoch_sees_every_example_once():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in global_batch_indices(step, n, batch, seed=3)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled each epoch
    assert global_batch_indices(3, n, batch, seed=3) == global_batch_indices(3, n, batch, seed=3)


def test_lora_end_to_end(setup, capsys):
    from finetune.lora import main
    from generate.lora import LoRAGenerateArgs
    from generate.lora import main as generate

    checkpoint_dir, data_dir, tmp_path = setup
    out_dir = tmp_path / "out"
    summary = main(lora_args(checkpoint_dir, data_dir, out_dir, max_steps=12))
    losses = logged(out_dir, "loss")
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # it learns
    assert len(logged(out_dir, "val_loss")) == 4  # steps 3, 6, 9 and the end
    for name in ("lit_lora_finetuned.pth", "state.pth", "hyperparameters.json", "step-000003/lit_lora_finetuned.pth"):
        assert (out_dir / name).is_file(), name
    lora_file = read_lora_file(out_dir / "lit_lora_finetuned.pth")
    assert lora_file["lora_config"]["targets"] == ("q", "v", "head") and lora_file["lora_config"]["r"] == 4
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    assert summary["peak_memory_bytes"] > 0 and summary["weights_bytes"] == (out_dir / "lit_lora_finetuned.pth").stat().st_size
    out = capsys.readouterr().out
    assert "step 12/12 | loss" in out and "tokens/s | ETA" in out and "val ppl" in out and "peak memory" in out

    texts = generate(LoRAGenerateArgs(checkpoint_dir=checkpoint_dir, lora_path=out_dir / "lit_lora_finetuned.pth",
                                      prompt="Say the word.", max_new_tokens=5, temperature=0.0))
    assert len(texts) == 1 and isinstance(texts[0], str)


INTERRUPTED_RUN = dict(lora_dropout=0.1, max_steps=4, save_interval=2, eval_interval=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_path, tokenizer):
    """The base model, the data and the uninterrupted run of INTERRUPTED_RUN, once for every place a Ctrl-C lands;
    each test resumes its interrupted run in its own folder and compares it with this one."""
    from finetune.lora import main

    checkpoint_dir, data_dir, folder = make_setup(tmp_path_factory.mktemp("uninterrupted"), tokenizer_path, tokenizer)
    summary = main(lora_args(checkpoint_dir, data_dir, folder / "full", **INTERRUPTED_RUN))
    return checkpoint_dir, data_dir, folder / "full", summary


@pytest.mark.parametrize("where", INTERRUPTS)
def test_interrupt_and_resume_equal_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch, where):
    import importlib

    from finetune.lora import main

    checkpoint_dir, data_dir, full_dir, full = uninterrupted
    run = INTERRUPTED_RUN

    module, name, call = INTERRUPTS[where]
    real = interrupt_at(monkeypatch, importlib.import_module(module), name, call)
    with pytest.raises(SystemExit) as exit_info:
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "resumed", **run))
    assert exit_info.value.code == 130
    assert torch.load(tmp_path / "resumed" / "state.pth", weights_only=True)["step"] == 2  # completed steps
    assert not hidden_leftovers(tmp_path / "resumed"), "a temporary file or folder was left behind"
    monkeypatch.setattr(importlib.import_module(module), name, real)

    resumed = main(lora_args(checkpoint_dir, data_dir, tmp_path / "resumed", resume="auto", **run))
    assert resumed["steps"] == 2 and resumed["final_loss"] == full["final_loss"]
    a, b = weights(full_dir), weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    if name == "loss_sum":  # interrupted after step 2 was saved: its step file is there, whole
        step_2 = read_lora_file(full_dir / "step-000002" / "lit_lora_finetuned.pth")["lora"]
        again = read_lora_file(tmp_path / "resumed" / "step-000002" / "lit_lora_finetuned.pth")["lora"]
        assert all(torch.equal(step_2[name], again[name]) for name in step_2)
    else:  # interrupted before step 2 was saved: the state holds step 2, but no step file was written
        assert not (tmp_path / "resumed" / "step-000002").exists()


def test_every_process_and_step_draws_its_own_dropout_masks():
    from lit_lora.train import step_seed

    seeds = {step_seed(seed, rank, step) for seed in (1, 2) for rank in range(4) for step in range(50)}
    assert len(seeds) == 2 * 4 * 50 and all(0 <= s < 2 ** 63 for s in seeds)  # a valid torch seed each
    assert step_seed(1337, 0, 7) == step_seed(1337, 0, 7)  # a pure function: a resumed run redraws the same


FINISHED_RUN = dict(max_steps=4, save_interval=2, eval_interval=0, eval_max_new_tokens=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_path, tokenizer):
    """The base model, the data and the out_dir of a finished FINISHED_RUN, made once; each test resumes a copy."""
    from finetune.lora import main

    checkpoint_dir, data_dir, folder = make_setup(tmp_path_factory.mktemp("finished"), tokenizer_path, tokenizer)
    main(lora_args(checkpoint_dir, data_dir, folder / "out", **FINISHED_RUN))
    return checkpoint_dir, data_dir, folder / "out"


@pytest.mark.parametrize("flag,value,words", [
    ("seed", 7, "--seed differs from the saved run's (1337 then, 7 now)"),
    ("global_batch_size", 4, "--global_batch_size differs from the saved run's (8 then, 4 now)"),
    ("lora_r", 2, "--lora_r differs from the saved run's (4 then, 2 now)"),
    ("learning_rate", 1e-3, "--learning_rate differs"),
    ("max_steps", 5, "--max_steps differs from the saved run's (4 then, 5 now)"),
])
def test_resuming_with_other_flags_is_refused(finished_run, tmp_path, flag, value, words):
    from finetune.lora import main

    checkpoint_dir, data_dir, saved = finished_run
    out_dir = shutil.copytree(saved, tmp_path / "out")  # this test's copy of the saved run
    with pytest.raises(ValueError, match=re.escape(words)):
        main(lora_args(checkpoint_dir, data_dir, out_dir, resume="auto", **{**FINISHED_RUN, flag: value}))
    # what only changes how the work is done (and its memory) may change
    main(lora_args(checkpoint_dir, data_dir, out_dir, resume="auto",
                   **{**FINISHED_RUN, "micro_batch_size": 2, "activation_checkpointing": True}))


def test_resuming_on_other_data_or_base_weights_is_refused(setup, tokenizer, tokenizer_path):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    run = dict(max_steps=2, eval_interval=0, eval_max_new_tokens=0)
    main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", **run))
    records = [{"instruction": "Say the word.", "input": "", "output": w} for w in WORDS * 2]
    prepare(records, tokenizer, tmp_path / "other_data", max_seq_length=256, test_split_size=4, seed=0)
    with pytest.raises(ValueError, match="the training data .train.pt. differs from the saved run's"):
        main(lora_args(checkpoint_dir, tmp_path / "other_data", tmp_path / "out", resume="auto", **run))
    other_base = make_checkpoint(tmp_path / "other_base", tokenizer_path, seed=1, block_size=256)
    with pytest.raises(ValueError, match="the base model's weights differs from the saved run's"):
        main(lora_args(other_base, data_dir, tmp_path / "out", resume="auto", **run))


def test_loss_is_normalised_over_the_whole_accumulated_batch(setup):
    """One global batch of 8 as 8 micro batches of 1 or as 2 of 4: the same loss and the same update.
    (Averaging per micro batch would weigh examples with few response tokens more.)"""
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    runs = [main(lora_args(checkpoint_dir, data_dir, tmp_path / f"micro{m}", micro_batch_size=m, max_steps=1,
                           lora_dropout=0.0, eval_interval=0, save_interval=0)) for m in (1, 4)]
    assert runs[0]["final_loss"] == pytest.approx(runs[1]["final_loss"], abs=1e-5)
    a, b = weights(tmp_path / "micro1"), weights(tmp_path / "micro4")
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    calls = {"n": 0}
    real_loss_sum = train_module.loss_sum

    def nan_at_step_3(model, input_ids, labels, lengths=None):
        calls["n"] += 1
        loss = real_loss_sum(model, input_ids, labels, lengths)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train_module, "loss_sum", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3.*last good checkpoint"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=6, save_interval=2, eval_interval=0))
    assert (tmp_path / "out" / "step-000002" / "lit_lora_finetuned.pth").is_file()
    assert torch.load(tmp_path / "out" / "state.pth", weights_only=True)["step"] == 2
    assert not (tmp_path / "out" / "lit_lora_finetuned.pth").exists()


def test_clear_errors(setup, tmp_path_factory):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    with pytest.raises(FileNotFoundError, match="missing.*does not exist.*convert_hf.py"):
        main(lora_args(tmp_path / "missing", data_dir, tmp_path / "o1"))
    with pytest.raises(FileNotFoundError, match="No prepared data in .*nodata.*prepare_data/alpaca.py"):
        main(lora_args(checkpoint_dir, tmp_path / "nodata", tmp_path / "o2"))
    with pytest.raises(ValueError, match=r"--lora_targets \['q', 'query'\]: \['query'\] are not targets; valid targets are q, k, v, o"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "o3", lora_targets=("q", "query")))
    other_tokenizer = tmp_path_factory.mktemp("other")
    make_checkpoint(other_tokenizer / "ckpt", _other_tokenizer(other_tokenizer), block_size=256)
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        main(lora_args(other_tokenizer / "ckpt", data_dir, tmp_path / "o4"))
    with pytest.raises(ValueError, match="--global_batch_size 8: must be divisible by --micro_batch_size \\(3\\)"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "o5", micro_batch_size=3))


def _other_tokenizer(folder):
    from lit_lora.tokenizer import Tokenizer

    Tokenizer.train(["completely different text here"] * 50 + ["more words to learn"] * 50, 300, folder / "tok")
    return folder / "tok.model"


def test_full_finetuning_from_scratch_writes_a_checkpoint_folder(setup, tokenizer_path, capsys):
    from finetune.full import FullArgs, main
    from generate.base import main as generate_base
    from generate.full import FullGenerateArgs
    from generate.full import main as generate_full
    from lit_lora.chat import GenerateArgs
    from lit_lora.checkpoint import load_model
    from lit_lora.tokenizer import Tokenizer

    checkpoint_dir, data_dir, tmp_path = setup
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    out_dir = tmp_path / "full"
    summary = main(FullArgs(checkpoint_dir=tokenizer_only, data_dir=data_dir, out_dir=out_dir, from_scratch=True,
                            model_name="tiny", precision="32-true", learning_rate=1e-2, global_batch_size=8,
                            micro_batch_size=4, max_steps=10, warmup_steps=2, eval_interval=0, eval_examples=4,
                            eval_max_new_tokens=3, save_interval=5))
    assert summary["trainable_parameters"] == summary["total_parameters"]
    losses = logged(out_dir, "loss")
    assert losses[-1] < 0.6 * losses[0]
    model = load_model(out_dir)  # out_dir is a checkpoint folder: every script loads it
    assert model.config.name == "tiny" and model.config.vocab_size == Tokenizer(tokenizer_path).vocab_size
    assert (out_dir / "step-000005" / "lit_model.pth").is_file()
    assert len(generate_full(FullGenerateArgs(checkpoint_dir=out_dir, prompt="Say the word.", max_new_tokens=3))) == 1
    assert len(generate_base(GenerateArgs(checkpoint_dir=out_dir, prompt="cat", max_new_tokens=3))) == 1
    with pytest.raises(ValueError, match="--from_scratch true needs --model_name"):
        main(FullArgs(checkpoint_dir=tokenizer_only, data_dir=data_dir, out_dir=tmp_path / "x", from_scratch=True))


def test_adapter_end_to_end_and_resume(setup, monkeypatch):
    from finetune.adapter import AdapterArgs, main
    from generate.adapter import AdapterGenerateArgs
    from generate.adapter import main as generate
    from lit_lora.method_files import read_adapter_file

    checkpoint_dir, data_dir, tmp_path = setup

    def args(out_dir, **overrides):
        values = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, precision="32-true",
                      learning_rate=0.3, global_batch_size=8, micro_batch_size=4, max_steps=16, warmup_epochs=None,
                      warmup_steps=1, eval_interval=0, eval_examples=4, eval_max_new_tokens=3, save_interval=0,
                      adapter_prompt_length=4, adapter_start_layer=0)
        values.update(overrides)
        return AdapterArgs(**values)

    full = main(args(tmp_path / "adapter"))
    losses = logged(tmp_path / "adapter", "loss")
    # on a random micro base the adapter's effect is small but steady (5.79 -> 5.63 here): the gate opens
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    saved = read_adapter_file(tmp_path / "adapter" / "lit_adapter_finetuned.pth")
    assert saved["adapter_config"] == {"prompt_length": 4, "start_layer": 0}
    assert full["trainable_parameters"] == 2 * (4 * 32 + 4)  # two adapted layers: K * n_embd + n_head each
    texts = generate(AdapterGenerateArgs(checkpoint_dir=checkpoint_dir, prompt="Say the word.", max_new_tokens=3,
                                         adapter_path=tmp_path / "adapter" / "lit_adapter_finetuned.pth"))
    assert len(texts) == 1

    calls, real_loss_sum = {"n": 0}, train_module.loss_sum

    def interrupt(model, input_ids, labels, lengths=None):
        calls["n"] += 1
        if calls["n"] == 9:  # the first micro batch of step 5
            raise KeyboardInterrupt
        return real_loss_sum(model, input_ids, labels, lengths)

    monkeypatch.setattr(train_module, "loss_sum", interrupt)
    with pytest.raises(SystemExit):
        main(args(tmp_path / "resumed"))
    monkeypatch.setattr(train_module, "loss_sum", real_loss_sum)
    resumed = main(args(tmp_path / "resumed", resume="auto"))
    assert resumed["steps"] == 12 and resumed["final_loss"] == full["final_loss"]
    a = read_adapter_file(tmp_path / "resumed" / "lit_adapter_finetuned.pth")["adapter"]
    assert all(torch.equal(a[name], saved["adapter"][name]) for name in a)


def test_adapter_warmup_is_counted_in_optimizer_steps(setup, capsys):
    """Two epochs of warmup on 20 examples in batches of 8: ceil(2 * 20 / 8) = 5 optimizer steps, so the
    learning rate peaks at step 5 (Lit-LLaMA compared micro-steps with optimizer steps: it never did)."""
    from finetune.adapter import AdapterArgs, main

    checkpoint_dir, data_dir, tmp_path = setup
    main(AdapterArgs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / "w", precision="32-true",
                     learning_rate=1e-2, global_batch_size=8, micro_batch_size=4, max_steps=8, warmup_epochs=2,
                     eval_interval=0, eval_examples=4, eval_max_new_tokens=1, save_interval=0, adapter_start_layer=1))
    lrs = logged(tmp_path / "w", "lr")
    assert lrs[:6] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1e-2]) and lrs[6] < 1e-2


def checkpoint_in(dtype, folder, tokenizer_path):
    """A micro checkpoint folder whose weights are stored in `dtype` (as bf16/fp16 checkpoints on the Hub are)."""
    from lit_lora.checkpoint import read_config, save_checkpoint_dir
    from lit_lora.tokenizer import Tokenizer

    make_checkpoint(folder, tokenizer_path, block_size=256)
    state_dict = torch.load(folder / "lit_model.pth", weights_only=True)
    return save_checkpoint_dir(folder, {name: tensor.to(dtype) for name, tensor in state_dict.items()},
                               read_config(folder / "model_config.json"), Tokenizer(folder).files)


# (checkpoint dtype, --precision) -> dtype of the trained LoRA tensors and AdamW moments, dtype of the frozen base.
# 32-true and the mixed precisions keep fp32 parameters (autocast computes in 16 bits); *-true is all 16-bit.
PRECISIONS = {
    ("bfloat16", "32-true"): (torch.float32, torch.float32),
    ("bfloat16", "bf16-mixed"): (torch.float32, torch.float32),
    ("bfloat16", "bf16-true"): (torch.bfloat16, torch.bfloat16),
    ("float16", "16-mixed"): (torch.float32, torch.float32),  # on a CPU Fabric computes 16-mixed in bf16
}


@pytest.mark.parametrize("checkpoint_dtype,precision", PRECISIONS)
def test_precision_decides_the_dtype_of_what_trains(setup, tokenizer_path, monkeypatch, checkpoint_dtype, precision):
    import finetune.lora as script

    _, data_dir, tmp_path = setup
    checkpoint_dir = checkpoint_in(getattr(torch, checkpoint_dtype), tmp_path / checkpoint_dtype, tokenizer_path)
    trained_dtype, frozen_dtype = PRECISIONS[checkpoint_dtype, precision]
    seen = {}
    real_fit = script.fit

    def recording_fit(fabric, model, args, save_weights):
        summary = real_fit(fabric, model, args, save_weights)
        seen.update({name: p.dtype for name, p in model.named_parameters()})
        return summary

    monkeypatch.setattr(script, "fit", recording_fit)
    summary = script.main(lora_args(checkpoint_dir, data_dir, tmp_path / precision, precision=precision, max_steps=3,
                                    eval_interval=0, eval_max_new_tokens=2))
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["val_loss"])
    assert {dtype for name, dtype in seen.items() if "lora_" in name} == {trained_dtype}
    assert {dtype for name, dtype in seen.items() if "lora_" not in name} == {frozen_dtype}
    state = torch.load(tmp_path / precision / "state.pth", weights_only=True)
    assert {t.dtype for t in state["model"].values()} == {trained_dtype}
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {trained_dtype}
    assert {t.dtype for t in weights(tmp_path / precision).values()} == {trained_dtype}
    lora_b = weights(tmp_path / precision)["blocks.0.attn.q_proj.lora_B"]
    assert lora_b.abs().sum() > 0 and torch.isfinite(lora_b).all()  # it trained, without NaN


def crash_at_rename(monkeypatch, call):
    """Make the `call`-th os.replace of lit_lora.files (every atomic write and folder swap) raise, as a crash
    in the middle of saving would; returns a counter of the renames seen."""
    import lit_lora.files as files

    real, seen = files.os.replace, {"n": 0}

    def replace(src, dst):
        seen["n"] += 1
        if seen["n"] == call:
            raise RuntimeError(f"injected crash at rename {call}")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    return seen


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_crash_at_any_rename_leaves_nothing_broken_and_resumes_exactly(setup, monkeypatch, method):
    """Whichever rename of a save a crash hits, every step folder is whole (or absent), no temporary file stays
    after the resumed run, and the resumed run ends with the weights of an uninterrupted one."""
    import finetune.full
    import finetune.lora
    from lit_lora.checkpoint import load_model

    checkpoint_dir, data_dir, tmp_path = setup

    def run(out_dir, **overrides):
        values = dict(max_steps=2, save_interval=1, eval_interval=0, eval_max_new_tokens=0, **overrides)
        if method == "lora":
            return finetune.lora.main(lora_args(checkpoint_dir, data_dir, out_dir, **values))
        return finetune.full.main(finetune.full.FullArgs(
            checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, precision="32-true", learning_rate=1e-3,
            global_batch_size=8, micro_batch_size=4, warmup_steps=1, eval_examples=4, **values))

    def final_weights(out_dir):
        if method == "lora":
            return weights(out_dir)
        return load_model(out_dir).state_dict()

    counter = crash_at_rename(monkeypatch, call=0)  # count the renames of an uninterrupted run
    run(tmp_path / "reference")
    renames = counter["n"]
    assert renames >= 6  # hyperparameters.json; the weights, their step folder and the state at steps 1 and 2
    reference = final_weights(tmp_path / "reference")
    for call in range(1, renames + 1):
        out_dir = tmp_path / f"crash{call}"
        crash_at_rename(monkeypatch, call)
        with pytest.raises(RuntimeError, match="injected crash"):
            run(out_dir)
        for step_dir in out_dir.glob("step-*"):  # a step folder is whole, or not there
            if method == "lora":
                read_lora_file(step_dir / "lit_lora_finetuned.pth")
            else:
                load_model(step_dir)
        (out_dir / ".state.pth.killed.tmp").write_bytes(b"half a file")  # what a kill -9 would leave
        (out_dir / ".step-000001.old-killed").mkdir()
        crash_at_rename(monkeypatch, call=0)
        run(out_dir, resume="auto")
        resumed = final_weights(out_dir)
        assert all(torch.equal(reference[name], resumed[name]) for name in reference), f"crash at rename {call}"
        assert not hidden_leftovers(out_dir), f"leftovers after the crash at rename {call}"
        if method == "full":
            load_model(out_dir / "step-000001")  # the step folder of a full finetuning run is a whole checkpoint


def test_saving_writes_the_weights_file_without_reading_the_state_back(setup, monkeypatch):
    """The method file is written from the gathered tensors in memory: state.pth (weights + both AdamW
    moments, 54 GB for a fully finetuned 7B) is written once and never read back by the run that wrote it."""
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    real_load = torch.load

    def guarded_load(f, *args, **kwargs):
        assert Path(str(f)).name != "state.pth", "the run read state.pth back"
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=2, save_interval=1, eval_interval=0))
    assert (tmp_path / "out" / "step-000001" / "lit_lora_finetuned.pth").is_file()


class RecordingFabric:
    """Just enough of Fabric for forward_backward on one process, recording each micro batch's sync setting."""

    world_size, device = 1, torch.device("cpu")

    def __init__(self):
        self.skipped_sync = []

    def all_reduce(self, tensor, reduce_op):
        return tensor

    def to_device(self, tensors):
        return tensors

    def no_backward_sync(self, model, enabled):
        import contextlib

        self.skipped_sync.append(enabled)
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def test_gradients_are_synchronised_after_every_micro_batch_only_when_sharded():
    """DDP may skip the gradient all-reduce until the last micro batch (its replicas hold whole gradients
    anyway); FSDP must reduce-scatter after every micro batch, or each device would hold the whole gradient."""
    from lit_lora.model import Config, LLaMA
    from lit_lora.train import forward_backward

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro"))
    micro_batches = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)), None) for _ in range(3)]
    for sharded, expected in ((False, [True, True, False]), (True, [False, False, False])):
        fabric = RecordingFabric()
        loss, figures = forward_backward(fabric, model, micro_batches, sync_every_micro_batch=sharded)
        assert fabric.skipped_sync == expected and math.isfinite(loss) and figures == {}


# One table of bad training flags and the words their errors must contain. Every value is refused while the
# flags are parsed (the dataclass's __post_init__), before anything is read or written.
BAD_TRAIN_FLAGS = [
    ("global_batch_size", -8, "--global_batch_size -8: must be at least 1"),
    ("global_batch_size", 0, "--global_batch_size 0: must be at least 1"),
    ("micro_batch_size", -4, "--micro_batch_size -4: must be at least 1"),
    ("micro_batch_size", 0, "--micro_batch_size 0: must be at least 1"),
    ("micro_batch_size", 3, "--global_batch_size 8: must be divisible by --micro_batch_size (3) x devices (1)"),
    ("devices", 0, "--devices 0: must be at least 1"),
    ("max_steps", -3, "--max_steps -3: must be at least 1"),
    ("max_steps", 0, "--max_steps 0: must be at least 1"),
    ("max_seq_length", 0, "--max_seq_length 0: must be at least 2"),
    ("log_interval", 0, "--log_interval 0: must be at least 1"),
    ("epochs", 0, "--epochs 0: must be positive"),
    ("epochs", -1, "--epochs -1: must be positive"),
    ("eval_examples", 0, "--eval_examples 0: must be at least 1"),
    ("learning_rate", 0, "--learning_rate 0: must be positive"),
    ("learning_rate", -1e-3, "--learning_rate -0.001: must be positive"),
    ("min_lr", 1.0, "--min_lr 1.0: must not exceed --learning_rate"),
    ("weight_decay", -0.1, "--weight_decay -0.1: must not be negative"),
    ("warmup_steps", -1, "--warmup_steps -1: must not be negative"),
    ("warmup_epochs", -1.0, "--warmup_epochs -1.0: must not be negative"),
    ("grad_clip", -1.0, "--grad_clip -1.0: must not be negative"),
    ("eval_interval", -1, "--eval_interval -1: must not be negative"),
    ("save_interval", -1, "--save_interval -1: must not be negative"),
    ("eval_max_new_tokens", -5, "--eval_max_new_tokens -5: must not be negative"),
    ("seed", -1, "--seed -1: must not be negative"),
    ("lora_r", 0, "--lora_r 0: the rank must be a whole number, at least 1"),
    ("lora_alpha", 0, "--lora_alpha 0: must be a positive, finite number"),
    ("lora_dropout", -0.1, "--lora_dropout -0.1: must be at least 0 and below 1"),
    ("lora_dropout", 1.0, "--lora_dropout 1.0: must be at least 0 and below 1"),
    ("lora_targets", (), "--lora_targets (): must be a list of targets from q, k, v, o, gate, up, down, head"),
    ("adapter_prompt_length", 0, "--adapter_prompt_length 0: the prompt needs a whole number of vectors, at least 1"),
    ("adapter_start_layer", -1, "--adapter_start_layer -1: must be a whole number, not negative"),
    ("model_name", "7b", "--model_name 7b: is not a preset"),
    ("from_scratch", True, "--from_scratch true needs --model_name"),
    ("quantize", "bnb.fp4", "--quantize bnb.fp4: is not a quantization mode; choose bnb.nf4"),
    ("quantize", "bnb.int8", "--quantize bnb.int8: is not a quantization mode"),
]


@pytest.mark.parametrize("flag,value,words", BAD_TRAIN_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_TRAIN_FLAGS])
def test_bad_training_flags_are_refused_while_parsing(tmp_path, flag, value, words):
    from finetune.adapter import AdapterArgs
    from finetune.full import FullArgs
    from finetune.lora import LoRAArgs

    classes = [cls for cls in (LoRAArgs, AdapterArgs, FullArgs) if flag in cls.__dataclass_fields__]
    for cls in classes:
        with pytest.raises(ValueError, match=re.escape(words)):
            cls(**{"out_dir": tmp_path / "out", "global_batch_size": 8, flag: value})
    assert classes and not (tmp_path / "out").exists()


def test_a_bad_training_flag_ends_the_script_with_one_line_and_exit_code_2(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LIT_LORA_TRACEBACK"}
    result = subprocess.run([sys.executable, "finetune/lora.py", "--max_steps", "-3", "--out_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --max_steps -3: must be at least 1 (leave it out to train for --epochs)"
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_ctrl_c_before_training_ends_with_one_line_and_exit_code_130(capsys, monkeypatch):
    """Ctrl-C while a script starts (say, inside torch.load of a 13 GB checkpoint): no traceback."""
    from dataclasses import dataclass

    from lit_lora.cli import cli

    @dataclass
    class NoFlags:
        pass

    def main(args):
        raise KeyboardInterrupt  # as torch.load would, on Ctrl-C

    monkeypatch.setattr("sys.argv", ["script.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli(main, NoFlags)
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "Interrupted."


def test_a_run_whose_labels_are_all_cut_is_an_error(setup):
    """--max_seq_length shorter than every prompt: every label would be cut, the loss 0 and nothing learned."""
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    with pytest.raises(ValueError, match="No training example of .* has a response token within --max_seq_length 20 "
                                         r"\(the shortest prompt is \d+ tokens\): nothing would be learned"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_seq_length=20))
    assert not (tmp_path / "out" / "lit_lora_finetuned.pth").exists()


def test_examples_without_labels_are_left_out_and_an_empty_test_split_is_said(tmp_path, tokenizer_path, tokenizer,
                                                                              capsys):
    from finetune.lora import main

    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    records = [{"instruction": "Say the word.", "input": "", "output": w} for w in WORDS]
    records.append({"instruction": "Repeat " + "the word " * 10, "input": "", "output": "cat"})  # a 209-token prompt
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=0, seed=0)
    summary = main(lora_args(checkpoint_dir, tmp_path / "data", tmp_path / "out", max_seq_length=180, max_steps=2,
                             global_batch_size=4, micro_batch_size=4, eval_interval=1))
    out = capsys.readouterr().out
    assert "Warning: 1 of 13 training examples have no response token within 180 tokens and are left out" in out
    assert "has no test examples: no validation loss will be computed" in out
    assert "val loss" not in out and summary["val_loss"] is None
    assert "12 training examples" in out


def test_out_dir_that_is_a_file_is_refused(setup):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="--out_dir .*a_file is a file, not a folder"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "a_file"))


@pytest.mark.parametrize("content", [b"", b"random bytes, not a checkpoint \x00\x01\x02", "old", "list"])
def test_a_damaged_or_foreign_weights_file_is_named(tmp_path, tokenizer_path, content):
    from lit_lora.checkpoint import load_model

    folder = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    state_dict = torch.load(folder / "lit_model.pth", weights_only=True)
    if content == "old":  # the pre-zip format of torch < 1.6, which cannot be memory-mapped
        torch.save(state_dict, folder / "lit_model.pth", _use_new_zipfile_serialization=False)
    elif content == "list":
        torch.save(list(state_dict.values()), folder / "lit_model.pth")
    else:
        (folder / "lit_model.pth").write_bytes(content)
    with pytest.raises(ValueError, match="lit_model.pth (cannot be read as a state dict saved by torch.save|holds a list)"):
        load_model(folder)


def test_a_weights_file_of_another_shape_is_named(tmp_path, tokenizer_path):
    from lit_lora.checkpoint import load_model

    folder = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    state_dict = torch.load(folder / "lit_model.pth", weights_only=True)
    state_dict["blocks.0.attn.q_proj.weight"] = torch.zeros(8, 32)
    del state_dict["norm.weight"]
    torch.save(state_dict, folder / "lit_model.pth")
    with pytest.raises(ValueError, match=r"lit_model.pth does not fit: missing tensors: \['norm.weight'\]"):
        load_model(folder)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tmp_path, tokenizer_path, tokenizer):
    from lit_lora.checkpoint import load_model, save_checkpoint_dir
    from lit_lora.model import Config, LLaMA

    model = LLaMA(Config.from_name("micro", vocab_size=tokenizer.vocab_size - 10))  # the tokenizer of another model
    folder = save_checkpoint_dir(tmp_path / "ckpt", model.state_dict(), model.config, [tokenizer_path])
    with pytest.raises(ValueError, match=rf"tokenizer.model has {tokenizer.vocab_size:,} tokens, more than the model's "
                                         rf"vocabulary of {tokenizer.vocab_size - 10:,}"):
        load_model(folder)


def test_a_method_file_on_other_base_weights_of_the_same_shape_loads_with_a_warning(tmp_path, tokenizer_path, capsys):
    from lit_lora.adapter import apply_adapter
    from lit_lora.checkpoint import load_model
    from lit_lora.lora import apply_lora
    from lit_lora.method_files import load_adapter, load_lora, save_adapter, save_lora

    base = make_checkpoint(tmp_path / "base", tokenizer_path, seed=0)
    other = make_checkpoint(tmp_path / "other", tokenizer_path, seed=1)
    save_lora(apply_lora(load_model(base)), tmp_path / "lora.pth")
    save_adapter(apply_adapter(load_model(base), start_layer=1), tmp_path / "adapter.pth")
    assert read_lora_file(tmp_path / "lora.pth")["base_fingerprint"] == load_model(base).base_fingerprint
    for load, path in ((load_lora, "lora.pth"), (load_adapter, "adapter.pth")):
        load(load_model(base), tmp_path / path)
        assert "Warning" not in capsys.readouterr().err
        load(load_model(other), tmp_path / path)
        assert f"Warning: {tmp_path / path} was trained on other base weights than these" in capsys.readouterr().err
    # the same model stored in another dtype is the same base; another model is not, even in the same dtype
    assert load_model(base, dtype=torch.bfloat16).base_fingerprint == load_model(base).base_fingerprint
    fp16 = checkpoint_in(torch.float16, tmp_path / "fp16", tokenizer_path)
    assert load_model(fp16, dtype=torch.bfloat16).base_fingerprint == load_model(fp16).base_fingerprint
    assert load_model(other, dtype=torch.bfloat16).base_fingerprint != load_model(base, dtype=torch.bfloat16).base_fingerprint


def test_training_never_uses_fabric_save(setup, monkeypatch):
    """Lightning's save writes the whole state into memory, then to a temporary file in the system temp folder
    (left there, state-sized, by a kill); the loop writes its state itself, beside the final file."""
    from lightning.fabric import Fabric

    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup

    def refuse(*args, **kwargs):
        raise AssertionError("Fabric.save was called")

    monkeypatch.setattr(Fabric, "save", refuse)
    main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=2, save_interval=1, eval_interval=0))
    assert torch.load(tmp_path / "out" / "state.pth", weights_only=True)["step"] == 2


def test_evaluation_prompts_in_the_prepared_datas_style_and_stops_at_its_end(tmp_path, monkeypatch, capsys):
    from finetune.lora import main
    from lit_lora.prompts import format_prompt
    from lit_lora.tokenizer import Tokenizer
    from tests.conftest import make_tokenizer_json_dir

    tokenizer_dir = make_tokenizer_json_dir(tmp_path / "llama3-base", "llama3", instruct=False)
    tokenizer = Tokenizer(tokenizer_dir)
    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_dir, block_size=256)
    records = [{"instruction": "Say the word.", "input": "", "output": w} for w in WORDS]
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=2, seed=0, style="llama3")
    calls, real_generate = [], train_module.generate

    def spy(model, prompts, **kwargs):
        calls.append((prompts[0].tolist(), kwargs["stop_ids"]))
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(train_module, "generate", spy)
    main(lora_args(checkpoint_dir, tmp_path / "data", tmp_path / "out", max_steps=2, eval_interval=0, save_interval=0,
                   eval_max_new_tokens=3, eval_instruction="Say the word.", eval_input="cat"))
    eot, end_of_text = (tokenizer.json_tokenizer.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert calls == [(tokenizer.encode(format_prompt("Say the word.", "cat", "llama3"), bos=True).tolist(),
                      (end_of_text, eot))]


def test_activation_checkpointing_saves_activations_and_trains_the_same_without_fsdp(setup):
    """--activation_checkpointing works with any method on one device: each Block keeps only its input for the
    backward pass (autograd saves less), and the run computes the same (dropout masks included) as without it."""
    from finetune.lora import main
    from lit_lora.devices import checkpoint_activations
    from lit_lora.lora import apply_lora, mark_only_lora_as_trainable
    from lit_lora.model import Config, LLaMA
    from tests.conftest import saved_by_autograd

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro", n_layer=3))
    apply_lora(model, r=4)
    mark_only_lora_as_trainable(model)
    input_ids = torch.randint(0, 256, (2, 24))
    before = saved_by_autograd(model.train(), input_ids, input_ids)
    checkpoint_activations(model)
    assert saved_by_autograd(model, input_ids, input_ids) < before / 2

    checkpoint_dir, data_dir, tmp_path = setup
    run = dict(max_steps=3, lora_dropout=0.1, eval_interval=0, save_interval=0, eval_max_new_tokens=0)
    plain = main(lora_args(checkpoint_dir, data_dir, tmp_path / "plain", **run))
    checkpointed = main(lora_args(checkpoint_dir, data_dir, tmp_path / "ckpt", activation_checkpointing=True, **run))
    assert checkpointed["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-6)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_a_lora_rank_larger_than_the_layers_is_refused_before_allocating(setup):
    """--lora_r 1000000000 would ask for gigabytes per layer: it is checked against the targeted layers' sides."""
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    with pytest.raises(ValueError, match=r"^--lora_r 1000000000: must be at most 16, the smallest side"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", lora_r=10**9))
