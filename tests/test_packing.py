"""Packed micro batches (--packing, the default): a micro batch's examples end to end in one row, each with its own
positions and attention, must compute what right-padded rows compute on the same examples, to fp32 rounding; and
what a run reports about its speed (padding, FLOP/s against the measured peak) and precision."""

import math
import re

import pytest
import torch

import lit_lora.devices as devices
from lit_lora.adapter import apply_adapter, mark_only_adapter_as_trainable
from lit_lora.data import IGNORE_INDEX, collate, pack
from lit_lora.flops import example_flops, matmul_peak_flops, run_setup, step_flops
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable
from lit_lora.memory import TrainingSetup
from lit_lora.model import Config, LLaMA
from lit_lora.train import loss_sum
from tests.conftest import logged, lora_args, weights

LENGTHS = (5, 17, 9, 30)


def examples(lengths=LENGTHS, prompts=(3, 0, 2, 0), seed=0) -> list[dict]:
    """Instruction-like examples: random tokens, the first prompts[i] of example i masked (0: none, as
    prepare_data --mask_inputs false makes them)."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for n, prompt in zip(lengths, prompts):
        input_ids = torch.randint(0, 256, (n,), generator=generator)
        labels = input_ids.clone()
        labels[:prompt] = IGNORE_INDEX
        result.append({"input_ids": input_ids, "labels": labels})
    return result


def test_pack_puts_examples_end_to_end_with_the_labels_of_collate():
    batch = examples()
    input_ids, labels, lengths = pack(batch, max_seq_length=20)  # the 30-token example is cut to 20, as collate does
    assert lengths == [5, 17, 9, 20] and input_ids.shape == labels.shape == (1, 51)
    starts = [0, 5, 22, 31]
    assert all(labels[0, start] == IGNORE_INDEX for start in starts)  # nothing predicts an example's first token
    assert torch.equal(input_ids[0, 22:31], batch[2]["input_ids"])
    padded_input_ids, padded_labels = collate(batch, max_seq_length=20)
    assert padded_input_ids.shape == (4, 20)
    # the same targets, in the same order: position t predicts t+1 in both layouts
    assert torch.equal(labels[0, 1:][labels[0, 1:] != IGNORE_INDEX], padded_labels[:, 1:][padded_labels[:, 1:] != IGNORE_INDEX])


@pytest.mark.parametrize("method", ["base", "lora", "adapter"])
def test_a_packed_row_computes_what_padded_rows_compute(method):
    """The loss and every trainable gradient, packed and padded, on the same examples: equal to fp32 rounding;
    and each example's logits in the packed row equal its logits read alone."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro"))  # grouped-query attention: 4 heads, 2 key/value groups
    if method == "lora":
        apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "up", "head"))
        mark_only_lora_as_trainable(model)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the update a value to test
                torch.nn.init.normal_(param, std=0.1)
    elif method == "adapter":
        apply_adapter(model, prompt_length=3, start_layer=1)
        mark_only_adapter_as_trainable(model)
        for name, param in model.named_parameters():
            if "gating_factor" in name:
                torch.nn.init.normal_(param, std=0.5)
    batch = examples()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(input_ids, labels, lengths):
        model.zero_grad(set_to_none=True)
        total = loss_sum(model, input_ids, labels, lengths)
        total.backward()
        return total.item(), [p.grad.clone() for p in trainable]

    padded_loss, padded_grads = loss_and_grads(*collate(batch, 64), None)
    packed_loss, packed_grads = loss_and_grads(*pack(batch, 64))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for padded, packed in zip(padded_grads, packed_grads):
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        input_ids, _, lengths = pack(batch, 64)
        packed_logits = model(input_ids, lengths=lengths)[0].split(lengths)
        for example, logits in zip(batch, packed_logits):
            torch.testing.assert_close(logits, model(example["input_ids"][None])[0], rtol=1e-5, atol=1e-5)


def test_positions_restart_in_each_example():
    """Without its own positions (RoPE from 0), the second example of a row would read differently: the test
    above would fail. Here directly: the row's cos is each example's cos from position 0."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro"))
    seen = {}
    original = model.blocks[0].attn.forward

    def spy(x, cos, sin, mask=None, input_pos=None, lengths=None):
        seen["cos"] = cos
        return original(x, cos, sin, mask, input_pos, lengths)

    model.blocks[0].attn.forward = spy
    input_ids, _, lengths = pack(examples((4, 6)), 64)
    model(input_ids, lengths=lengths)
    torch.testing.assert_close(seen["cos"], torch.cat([model.cos[:4], model.cos[:6]]))
    with pytest.raises(ValueError, match="sequence of 65 tokens: the context is 64"):
        model(torch.zeros(1, 70, dtype=torch.long), lengths=[5, 65])


def test_training_packed_equals_padded_and_reports_its_padding(setup, capsys):
    """Two runs on the same data, packed (default) and padded: the same losses and weights to fp32 rounding (no
    dropout: its masks are drawn on each layout's shape); the padded run says how much it computed for nothing."""
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    summaries = {}
    for packing in (True, False):
        out_dir = tmp_path / f"packing-{packing}"
        summaries[packing] = main(lora_args(checkpoint_dir, data_dir, out_dir, packing=packing, lora_dropout=0.0,
                                            max_steps=4, eval_interval=0, save_interval=0))
    losses = {packing: logged(tmp_path / f"packing-{packing}", "loss") for packing in (True, False)}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert summaries[True]["val_loss"] == pytest.approx(summaries[False]["val_loss"], rel=1e-5)
    packed, padded = weights(tmp_path / "packing-True"), weights(tmp_path / "packing-False")
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6)

    # the padding of the padded run, worked out from the data: each micro batch of 4 padded to its longest
    train = torch.load(data_dir / "train.pt", weights_only=True)
    from lit_lora.data import global_batch_indices
    tokens = positions = 0
    for step in range(4):
        lengths = [len(train[i]["input_ids"]) for i in global_batch_indices(step, len(train), 8, seed=1337)]
        tokens += sum(lengths)
        positions += sum(4 * max(lengths[j:j + 4]) for j in (0, 4))
    assert summaries[False]["padding"] == pytest.approx(1 - tokens / positions) and summaries[False]["padding"] > 0.05
    assert summaries[True]["padding"] == 0
    assert logged(tmp_path / "packing-True", "padding") == [0.0] * 4
    out = capsys.readouterr().out
    assert "padding 0% of the positions computed" in out
    assert f"padding {100 * summaries[False]['padding']:.0f}% of the positions computed" in out
    for summary in summaries.values():  # the real tokens' FLOP/s against the peak measured in the run
        assert 0 < summary["flops_per_sec"] < summary["peak_flops_per_sec"] < 1e16
    assert re.search(r"Compute: [\d.,]+ GFLOP/s of real tokens per device, \d+% of the [\d,]+ GFLOP/s this device "
                     r"multiplies float32 matrices at", out)


def test_the_flops_of_a_run_add_up_over_its_examples():
    """A micro batch of equal lengths costs what its examples cost one by one (the padded estimate of
    finetune/compare.py and the run's real-token count agree where there is no padding)."""
    config = Config.from_name("micro")
    for method in ("lora", "adapter", "full"):
        setup = TrainingSetup(method=method, precision="32-true", micro_batch_size=4, seq_length=40,
                              label_fraction=0.25, adapter_start_layer=1)
        assert step_flops(config, setup)["total"] == pytest.approx(4 * example_flops(config, setup, 40, 10))
    from finetune.adapter import AdapterArgs
    from finetune.full import FullArgs
    from finetune.lora import LoRAArgs

    assert run_setup(LoRAArgs(lora_r=16, lora_targets=("q", "k")), "32-true").lora_r == 16
    assert run_setup(LoRAArgs(quantize="bnb.nf4"), "32-true").method == "qlora"
    assert run_setup(AdapterArgs(), "32-true").method == "adapter"
    assert run_setup(FullArgs(), "32-true").method == "full"


def test_the_measured_matmul_peak_is_a_plausible_speed():
    flops = matmul_peak_flops(torch.float32, torch.device("cpu"))
    assert 1e8 < flops < 1e14 and math.isfinite(flops)


@pytest.mark.parametrize("native, expected", [("AVX512-BF16", "bf16-mixed"), ("AMX", "bf16-mixed"), ("", "32-true")])
def test_the_default_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native == "AVX512-BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native == "AMX", raising=False)
    assert devices.default_precision() == expected
    line = devices.precision_line(expected, "cpu")
    assert line.startswith(f"Precision {expected}: ") and (native in line if native else "no native bf16" in line)


def test_a_run_without_precision_says_what_it_chose(setup, capsys):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    summary = main(lora_args(checkpoint_dir, data_dir, tmp_path / "out", precision=None, max_steps=1, eval_interval=0))
    out = capsys.readouterr().out
    chosen = devices.default_precision()
    assert devices.precision_line(chosen, "cpu") in out and summary["steps"] == 1
