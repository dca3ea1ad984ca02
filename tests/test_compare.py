"""The memory estimate (lit_lora/memory.py) against hand arithmetic and autograd, and finetune/compare.py end to end."""

import csv
import importlib.util
import math

import pytest
import torch

from lit_lora.adapter import apply_adapter, mark_only_adapter_as_trainable
from lit_lora.data import prepare
from lit_lora.flops import step_flops
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable
from lit_lora.memory import (
    TrainingSetup,
    count_parameters,
    estimate_memory,
    saved_tensors,
)
from lit_lora.model import PRESETS, Config, LLaMA
from lit_lora.report import num_parameters
from tests.conftest import FAMILIES, WORDS, make_checkpoint, saved_by_autograd


def build(config: Config, setup: TrainingSetup, dtype=torch.float32) -> LLaMA:
    """The model finetune/<method>.py trains, with the setup's hyperparameters."""
    model = LLaMA(config).to(dtype)
    if setup.method == "lora":
        apply_lora(model, r=setup.lora_r, alpha=2 * setup.lora_r, dropout=setup.lora_dropout, targets=setup.lora_targets)
        mark_only_lora_as_trainable(model)
    elif setup.method == "adapter":
        apply_adapter(model, prompt_length=setup.adapter_prompt_length, start_layer=setup.adapter_start_layer)
        mark_only_adapter_as_trainable(model)
    return model.train()


@pytest.mark.parametrize("name", ["tiny", "7B", "Llama-2-70b"])
@pytest.mark.parametrize("setup", [
    TrainingSetup(method="full"),
    TrainingSetup(method="lora"),
    TrainingSetup(method="lora", lora_r=4, lora_targets=("q", "k", "v", "o", "gate", "up", "down", "head")),
    TrainingSetup(method="adapter"),
    TrainingSetup(method="adapter", adapter_prompt_length=3, adapter_start_layer=1),
], ids=["full", "lora-qv", "lora-all", "adapter", "adapter-k3-from1"])
def test_parameter_counts_equal_the_real_models(name, setup):
    with torch.device("meta"):  # shapes only: 70B costs nothing
        model = build(Config.from_name(name), setup)
    assert count_parameters(Config.from_name(name), setup) == (num_parameters(model, trainable=True),
                                                                num_parameters(model))


def test_adapter_start_layer_must_be_below_n_layer():
    with pytest.raises(ValueError, match="start_layer"):
        count_parameters(Config.from_name("micro"), TrainingSetup(method="adapter", adapter_start_layer=2))


def test_7b_reference_counts():
    config = Config.from_name("7B")
    assert count_parameters(config, TrainingSetup(method="lora")) == (4_194_304, 6_738_415_616 + 4_194_304)
    assert count_parameters(config, TrainingSetup(method="adapter"))[0] == 1_229_760  # the paper's 1.2M


def test_weights_gradients_optimizer_by_hand():
    # micro: 2 layers, n_embd 32, 4 heads in 2 key/value groups (head size 8, k/v width 16), MLP 64, vocab 256
    config = Config.from_name("micro")
    block = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k, v, o, gate/up/down, 2 norms
    base = 2 * block + 2 * 256 * 32 + 32  # + embedding, lm_head, final norm
    assert base == 34_976
    lora = 2 * (8 * (32 + 32) + 8 * (32 + 16))  # r = 8 on q (32 -> 32) and v (32 -> 16) in 2 layers

    e = estimate_memory(config, TrainingSetup(method="lora", precision="bf16-true"))
    assert (e.weights, e.gradients, e.optimizer) == ((base + lora) * 2, lora * 2, lora * 2 * 2)  # moments in bf16
    e = estimate_memory(config, TrainingSetup(method="full", precision="32-true"))
    assert (e.weights, e.gradients, e.optimizer) == (base * 4, base * 4, base * 8)
    assert e.optimizer_scratch == base * 4  # the multi-tensor AdamW's sqrt(v) on a GPU
    e = estimate_memory(config, TrainingSetup(method="full", precision="bf16-mixed"))  # fp32 weights and moments
    assert (e.weights, e.gradients, e.optimizer) == (base * 4, base * 4, base * 8)
    adapter = 1 * (3 * 32 + 4)  # one layer from start_layer 1: a 3 x 32 prompt and 4 gates
    e = estimate_memory(config, TrainingSetup(method="adapter", adapter_prompt_length=3, adapter_start_layer=1))
    assert (e.trainable_parameters, e.gradients, e.optimizer) == (adapter, adapter * 2, adapter * 4)


def test_activations_by_the_documented_formula():
    """Full finetuning of micro in bf16-true, B = 2, T = 8, every position a label (N = R = 16)."""
    config = Config.from_name("micro")
    s, B, T, C, I, H, V = 2, 2, 8, 32, 64, 4, 256
    R = N = B * T
    block = (8 + 8 * s) * R * C + 4 * s * R * I + 8 * R + 4 * B * H * T  # the docstring of saved_tensors
    head = 4 * R * C + 4 * R + s * R * C + R + s * N * C  # final norm, label mask, lm_head input
    loss = 8 * N + 4  # targets, normaliser
    e = estimate_memory(config, TrainingSetup(method="full", micro_batch_size=B, seq_length=T))
    assert e.activations == 8 * R + 2 * block + head + loss  # + the embedding's token ids
    assert e.logits == 3 * 4 * N * V  # fp32 log-probabilities, their gradient, the logits' gradient
    assert e.total == e.weights + e.gradients + e.optimizer + max(e.activations + e.logits, e.optimizer_scratch)


ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")
METHODS = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),  # finetune/lora.py's defaults: q and v, dropout 0.05
    "lora-no-dropout": dict(method="lora", lora_dropout=0.0),
    "lora-k-o-up-down-head": dict(method="lora", lora_targets=("k", "o", "up", "down", "head")),
    "lora-all": dict(method="lora", lora_targets=ALL_TARGETS),
    "lora-all-no-dropout": dict(method="lora", lora_targets=ALL_TARGETS, lora_dropout=0.0),
    "lora-head-only": dict(method="lora", lora_targets=("head",)),  # no Block needs a gradient
    "adapter": dict(method="adapter", adapter_prompt_length=3, adapter_start_layer=1),  # layer 0 saves nothing
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_saved_tensors_equal_what_autograd_saves(method, family, precision):
    torch.manual_seed(0)
    config = Config.from_name(family, n_layer=3, block_size=64, vocab_size=256, **FAMILIES[family])
    B, T = 2, 24
    input_ids = torch.randint(0, config.padded_vocab_size, (B, T))
    labels = input_ids.clone()
    labels[:, :10] = -100  # a masked prompt: logits only at the 2 x 14 positions that predict a label
    setup = TrainingSetup(precision=precision, micro_batch_size=B, seq_length=T, label_fraction=2 * 14 / (B * T),
                          device="cpu", lora_r=4, **METHODS[method])
    model = build(config, setup, torch.float32 if precision == "32-true" else torch.bfloat16)
    assert sum(saved_tensors(config, setup).values()) == saved_by_autograd(model, input_ids, labels)


def test_the_scaled_down_families_keep_their_presets_shapes():
    for family, overrides in FAMILIES.items():
        preset, scaled = Config.from_name(family), Config.from_name(family, **overrides)
        assert preset.n_head // preset.n_query_groups == scaled.n_head // scaled.n_query_groups, family
        assert preset.intermediate_size / preset.n_embd == pytest.approx(scaled.intermediate_size / scaled.n_embd,
                                                                          rel=0.01), family
        assert ("intermediate_size" in PRESETS[family]) == ("intermediate_size" in overrides), family


def test_7b_against_the_references():
    config = Config.from_name("7B")
    lora = estimate_memory(config, TrainingSetup(method="lora", precision="bf16-true"))
    adapter = estimate_memory(config, TrainingSetup(method="adapter", precision="bf16-true"))
    # Lit-LLaMA measured about 21 GB (LoRA) and 22 GB (Adapter) on an A100, allocator overhead included
    assert 17e9 < lora.total < 21e9 and 17e9 < adapter.total < 22e9
    assert lora.weights == 2 * lora.total_parameters and lora.optimizer < 20e6
    full_fp32 = estimate_memory(config, TrainingSetup(method="full", precision="32-true"))
    assert full_fp32.weights + full_fp32.gradients + full_fp32.optimizer == 16 * 6_738_415_616 > 80e9
    fsdp = estimate_memory(config, TrainingSetup(method="full", devices=4, activation_checkpointing=True))
    assert fsdp.total < 22e9  # the reference ran on 4 GPUs with FSDP at up to 22 GB each
    flops = {m: step_flops(config, TrainingSetup(method=m))["total"] for m in ("lora", "full")}
    assert flops["lora"] / flops["full"] == pytest.approx(2 / 3, abs=0.02)  # only W0's weight gradients are skipped


def write_metrics(path, step_times: list[float], step_tokens: list[int]) -> None:
    """A metrics.csv as fit() logs it: a row per optimizer step, then the final evaluation's row."""
    path.parent.mkdir(parents=True)
    rows = ["loss,lr,step,step_time_s,step_tokens,tokens_per_sec,val_loss,val_ppl"]
    for step, (step_time, tokens) in enumerate(zip(step_times, step_tokens)):
        rate = sum(step_tokens[:step + 1]) / sum(step_times[:step + 1])  # since the start, as fit() logs it
        rows.append(f"1.0,0.1,{step + 1},{step_time!r},{tokens},{rate!r},,")
    rows.append(f",,{len(step_times)},,,,2.5,12.18")
    path.write_text("\n".join(rows) + "\n")


def test_loop_timing_reads_each_steps_time_and_tokens(tmp_path):
    from finetune.compare import loop_timing

    step_times = [5.0, 1.0, 9.0, 1.5, 2.0]  # the first step is slow (AdamW allocates its state); a busy machine
    step_tokens = [100, 120, 90, 110, 130]
    write_metrics(tmp_path / "run" / "logs" / "version_10" / "metrics.csv", step_times, step_tokens)
    write_metrics(tmp_path / "run" / "logs" / "version_9" / "metrics.csv", [7.0] * 5, [50] * 5)  # an older run
    time_per_step, tokens_per_sec = loop_timing(tmp_path / "run")
    assert time_per_step == pytest.approx(1.75)  # the median of steps 2..5: 1.0, 9.0, 1.5, 2.0
    rates = sorted(tokens / seconds for tokens, seconds in zip(step_tokens[1:], step_times[1:]))  # 10, 65, 73.3, 120
    assert tokens_per_sec == pytest.approx((rates[1] + rates[2]) / 2)

    write_metrics(tmp_path / "one" / "logs" / "version_0" / "metrics.csv", [3.0], [60])  # a one-step run: step 1
    assert loop_timing(tmp_path / "one") == (3.0, 20.0)


def test_estimate_only_needs_no_checkpoint(capsys):
    from finetune.compare import CompareArgs, main

    result = main(CompareArgs(estimate_only=True, model_name="7B", precision="bf16-true", data_dir="no/such/dir"))
    assert list(result["estimates"]) == ["lora", "adapter", "full"] and result["results"] == []
    assert result["estimates"]["lora"].setup.seq_length == 256
    out = capsys.readouterr().out
    assert "| **total** | **19.0 GB** | **18.2 GB** | **67.4 GB** |" in out


def test_estimate_only_with_qlora_prints_the_fourth_column(capsys):
    """QLoRA's estimate needs no bitsandbytes: LoRA's, with the Blocks' weights at 0.5159 bytes (NF4 + double
    quantization) instead of bf16's 2."""
    from finetune.compare import CompareArgs, main

    result = main(CompareArgs(estimate_only=True, model_name="7B", precision="bf16-true", data_dir="no/such/dir",
                              methods=("lora", "qlora", "adapter", "full")))
    lora, qlora = result["estimates"]["lora"], result["estimates"]["qlora"]
    assert qlora.weights == pytest.approx(lora.weights - 32 * 202_383_360 * (2 - 0.5159), rel=1e-4)
    assert "| | LoRA | QLoRA | LLaMA-Adapter | Full finetuning |" in (out := capsys.readouterr().out)
    assert "| **total** | **19.0 GB** | **9.4 GB** | **18.2 GB** | **67.4 GB** |" in out


def test_an_estimate_without_precision_is_for_the_precision_of_a_gpu_run(capsys):
    """On a CPU-only machine too: the estimate describes a GPU run, which defaults to bf16-true (not the
    32-true a CPU run would take: 327.6 GB for LoRA on Llama-2-70b instead of 167.3 GB)."""
    from finetune.compare import CompareArgs, main

    result = main(CompareArgs(estimate_only=True, model_name="Llama-2-70b", data_dir="no/such/dir"))
    assert {e.setup.precision for e in result["estimates"].values()} == {"bf16-true"}
    assert "(Llama-2-70b, bf16-true, micro batch 4 x 256 tokens, cuda" in capsys.readouterr().out


def test_compare_end_to_end(tmp_path, tokenizer_path, tokenizer, capsys):
    from finetune.compare import CSV_COLUMNS, CompareArgs, main

    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256, n_layer=3)  # adapter: layer 2 up
    records = [{"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"} for w in WORDS]
    prepare(records, tokenizer, tmp_path / "data", max_seq_length=256, test_split_size=4, seed=0)
    out_dir = tmp_path / "compare"
    main(CompareArgs(checkpoint_dir=checkpoint_dir, data_dir=tmp_path / "data", out_dir=out_dir, max_steps=3,
                     micro_batch_size=2, global_batch_size=4, precision="32-true", eval_examples=4, warmup_steps=1))

    with open(out_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["lora", "adapter", "full", "base"]
    assert tuple(rows[0]) == CSV_COLUMNS + ("test_loss", "test_perplexity")
    # Quality: each model's loss over the whole test split, as evaluate_test_split computes it on the saved weights
    from lit_lora.checkpoint import load_model
    from lit_lora.evaluate_data import EvaluateArgs, evaluate_test_split

    for row, folder in ((rows[3], checkpoint_dir), (rows[2], out_dir / "full")):
        expected = evaluate_test_split(load_model(folder).eval(), tokenizer,
                                       EvaluateArgs(checkpoint_dir=folder, data_dir=tmp_path / "data"))
        assert float(row["test_loss"]) == pytest.approx(expected["loss"], rel=1e-6)
        assert float(row["test_perplexity"]) == pytest.approx(math.exp(expected["loss"]), rel=1e-6)
    assert len({round(float(r["test_loss"]), 6) for r in rows}) == 4  # each model its own loss
    base_row = rows.pop()
    assert base_row["trainable_parameters"] == "" and base_row["peak_memory_bytes"] == ""
    for r in rows:
        for column in ("trainable_parameters", "checkpoint_bytes", "peak_memory_bytes", "predicted_memory_bytes",
                       "time_per_step_s", "tokens_per_sec", "val_loss"):
            assert float(r[column]) > 0 and math.isfinite(float(r[column])), (r["method"], column)
        assert int(r["steps"]) == 3
        with open(out_dir / r["method"] / "logs" / "version_0" / "metrics.csv") as f:  # what fit() logged
            step_times = [float(row["step_time_s"]) for row in csv.DictReader(f) if row["step_time_s"]]
        assert len(step_times) == 3  # the median of steps 2 and 3 is their mean
        assert float(r["time_per_step_s"]) == pytest.approx((step_times[1] + step_times[2]) / 2), r["method"]
    lora, adapter, full = rows
    assert int(lora["trainable_parameters"]) < int(full["trainable_parameters"]) == int(full["total_parameters"])
    assert int(lora["checkpoint_bytes"]) < int(full["checkpoint_bytes"])
    assert int(full["checkpoint_bytes"]) == (out_dir / "full" / "lit_model.pth").stat().st_size
    assert int(lora["checkpoint_bytes"]) == (out_dir / "lora" / "lit_lora_finetuned.pth").stat().st_size

    table = (out_dir / "results.md").read_text()
    for text in ("| method | trainable parameters | checkpoint size | peak memory |", "| time per step | tokens/s | val loss |",
                 "| LoRA |", "| LLaMA-Adapter |", "| Full finetuning |", "## Predicted memory",
                 "| model | test loss | test perplexity |", f"| Base model | {float(base_row['test_loss']):.4f} |"):
        assert text in table, text
    assert (out_dir / "results.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    out = capsys.readouterr().out
    assert "Predicted memory of one training step" in out and "above the" in out

    # Run again in the same out_dir: refused before any method runs, unless --overwrite (the earlier runs go)
    again = dict(checkpoint_dir=checkpoint_dir, data_dir=tmp_path / "data", out_dir=out_dir, max_steps=3,
                 micro_batch_size=2, global_batch_size=4, precision="32-true", eval_examples=4, warmup_steps=1,
                 methods=("lora",), evaluate=False)
    saved = (out_dir / "lora" / "state.pth").read_bytes()
    with pytest.raises(ValueError, match=r"compare/lora hold\(s\) the runs of an earlier comparison: measure again "
                                         r"with --overwrite true"):
        main(CompareArgs(**again))
    assert (out_dir / "lora" / "state.pth").read_bytes() == saved
    main(CompareArgs(**again, overwrite=True))
    assert "lora" in (out_dir / "results.md").read_text().lower()


def test_compare_reads_the_scripts_defaults_without_checking_their_default_out_dirs(tmp_path, monkeypatch):
    """A saved run in a script's default out_dir (out/lora/alpaca after README's finetune) is that run's business:
    compare.py only reads the scripts' default hyperparameters, and runs in its own --out_dir."""
    from finetune.compare import CompareArgs, main

    monkeypatch.chdir(tmp_path)
    for method in ("lora", "adapter", "full"):
        (tmp_path / "out" / method / "alpaca").mkdir(parents=True)
        (tmp_path / "out" / method / "alpaca" / "state.pth").write_bytes(b"a saved run")
    result = main(CompareArgs(estimate_only=True, model_name="7B", data_dir="no/such/dir"))
    assert result["estimates"]["lora"].setup.lora_r == 8
