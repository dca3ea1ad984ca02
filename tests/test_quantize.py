"""QLoRA: NF4 weights through bitsandbytes (lit_lora/quantize.py), LoRA on them, and the scripts' --quantize.

Every test that quantizes skips where bitsandbytes is not installed (pip install -e ".[quantize]"); the errors for
a missing bitsandbytes and for flags that cannot be quantized are checked everywhere."""

import copy
import importlib
import math
import re
import sys

import pytest
import torch

from lit_lora.checkpoint import load_model
from lit_lora.lora import (
    LoRALinear,
    apply_lora,
    mark_only_lora_as_trainable,
    merge_lora,
)
from lit_lora.method_files import load_lora, read_lora_file, save_lora
from lit_lora.model import Config, LLaMA
from lit_lora.quantize import (
    NF4_LEVELS,
    QUANTIZE_MODES,
    Linear4bit,
    dequantize_nf4,
    is_4bit,
    linear_4bit,
    load_model_4bit,
    nf4_levels,
    nf4_reference,
    quantize_blocks,
    quantize_nf4,
)
from lit_lora.report import num_parameters
from tests.conftest import (
    INTERRUPTS,
    interrupt_at,
    logged,
    lora_args,
    make_checkpoint,
    weights,
)


def bitsandbytes_imports() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


needs_bitsandbytes = pytest.mark.skipif(not bitsandbytes_imports(),
                                        reason="bitsandbytes is not installed: pip install -e '.[quantize]'")

def micro_model(seed=0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(Config.from_name("micro")).eval()


def nf4_reference_model(model: LLaMA) -> LLaMA:
    """A copy of `model` whose Blocks' linear weights went through NF4 and back in plain torch (nf4_reference):
    what a model with 4-bit Blocks must compute, to within float rounding."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.blocks.modules():
            if type(module) is torch.nn.Linear:
                module.weight.copy_(nf4_reference(module.weight))
    return reference


def relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------------
# NF4: bitsandbytes against the reference in plain torch


@needs_bitsandbytes
def test_the_16_levels_are_the_normal_quantiles_bitsandbytes_uses():
    import bitsandbytes.functional as F

    levels = nf4_levels()
    assert levels.shape == (16,) and torch.equal(levels, levels.sort().values)
    assert levels[0] == -1 and levels[7] == 0 and levels[15] == 1  # 7 negative levels, zero, 8 positive ones
    assert torch.allclose(levels, torch.tensor(NF4_LEVELS), atol=3e-7)  # derived = the table, to float rounding
    assert torch.equal(torch.tensor(NF4_LEVELS), F.get_4bit_type("nf4", device="cpu"))


@needs_bitsandbytes
# whole blocks; a partial last block; blocks across rows (d_in 32, 96: bitsandbytes' CPU kernel gets these wrong
# on a CPU with AVX512-BF16 unless dequantize_nf4 and linear_4bit flatten them, see dequantize_nf4)
@pytest.mark.parametrize("shape", [(48, 32), (7, 10), (3, 200), (5, 96), (4, 128)])
def test_bitsandbytes_dequantizes_to_the_reference_nf4_of_blocks_of_64(shape):
    """The 4-bit weights the model computes with are exactly nf4_reference's: 16 levels times one absmax per 64
    weights, and so are its products. The reference with another block size, or with one scale for the whole
    matrix, is far off: this test fails if either were wrong."""
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different scales
    packed = quantize_nf4(weight)
    n_blocks = math.ceil(weight.numel() / 64)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(weight.numel() / 2)  # two weights per byte
    assert packed.quant_state.absmax.shape == (n_blocks,) and packed.quant_state.blocksize == 64
    assert torch.equal(dequantize_nf4(packed), nf4_reference(weight))
    x = torch.randn(3, shape[1])
    assert torch.allclose(linear_4bit(x, packed), x @ nf4_reference(weight).t(), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    linear_4bit(x, packed).sum().backward()  # dx = dy W with dy = 1: W's column sums in every row
    assert torch.allclose(x.grad, nf4_reference(weight).sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    assert relative_rms(nf4_reference(weight, block_size=128), nf4_reference(weight)) > 0.01 or n_blocks == 1
    assert relative_rms(nf4_reference(weight, block_size=weight.numel()), nf4_reference(weight)) > 0.01
    assert relative_rms(dequantize_nf4(packed), weight) < 0.12


@needs_bitsandbytes
def test_double_quantization_keeps_8_bit_scales_close_to_the_fp32_ones():
    torch.manual_seed(0)
    weight = torch.randn(64, 512)  # 512 blocks: two blocks of 256 scales
    packed = quantize_nf4(weight, double_quantization=True)
    state = packed.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8 and state.absmax.shape == (512,)
    assert state.state2.blocksize == 256 and state.state2.absmax.shape == (2,)  # one fp32 scale per 256 scales
    assert relative_rms(dequantize_nf4(packed), nf4_reference(weight)) < 0.01  # only the scales' 8-bit rounding


def test_an_nf4_round_trip_puts_each_weight_on_the_nearest_level_of_its_block():
    """nf4_reference itself: every weight becomes q_i * absmax of its block of 64 for the level q_i nearest to
    w / absmax, so its error is at most half the widest gap between two levels, times absmax; each block's
    largest weight is kept exactly (it is +-1 times absmax)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    blocks, rounded = weight.reshape(-1, 64), nf4_reference(weight).reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    distances = (blocks.unsqueeze(-1) / absmax.unsqueeze(-1) - levels).abs()  # (blocks, 64, 16)
    nearest = levels[distances.argmin(dim=-1)] * absmax
    assert torch.allclose(rounded, nearest, atol=1e-6)
    widest_gap = (levels[1:] - levels[:-1]).max()
    assert ((rounded - blocks).abs() <= widest_gap / 2 * absmax + 1e-6).all()
    largest = blocks.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(rounded.gather(1, largest), blocks.gather(1, largest))


# ---------------------------------------------------------------------------------------------------------
# The model with 4-bit Blocks


@needs_bitsandbytes
@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_quantized_logits_are_those_of_the_plain_torch_nf4_weights(mode):
    model = micro_model()
    nf4 = nf4_reference_model(model)
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    untouched = {name: model.get_parameter(name) for name in ("embed.weight", "lm_head.weight", "norm.weight",
                                                              "blocks.0.attn_norm.weight")}
    parameters = num_parameters(model)
    with torch.no_grad():
        plain, reference = model(idx), nf4(idx)
        quantize_blocks(model, mode)
        logits = model(idx)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, Linear4bit) for m in linears) == 7 * model.config.n_layer  # q k v o gate up down
    assert all(model.get_parameter(name) is p for name, p in untouched.items())  # embedding, norms, lm_head as they were
    assert num_parameters(model) == parameters  # a 4-bit weight counts its weights, not its bytes
    # bnb.nf4 computes what the plain-torch NF4 weights compute; bnb.nf4-dq rounds the scales to 8 bits as well,
    # which moves the logits far less than NF4 itself does
    nf4_error = relative_rms(reference, plain)
    assert nf4_error > 0 and relative_rms(logits, reference) < (1e-5 if mode == "bnb.nf4" else 0.2 * nf4_error)
    # each Linear4bit computes x dequantize(W)^T: the same as an nn.Linear holding the dequantized weight
    q_proj = model.blocks[0].attn.q_proj
    x = torch.randn(3, 32)
    assert torch.allclose(q_proj(x), x @ dequantize_nf4(q_proj.weight).T, atol=1e-6)


@needs_bitsandbytes
def test_lora_on_a_4bit_linear_computes_w0_x_plus_scaled_b_a_x_and_trains_only_a_and_b():
    model = micro_model()
    quantize_blocks(model, "bnb.nf4")
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q", "v", "down"))
    mark_only_lora_as_trainable(model)
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(q_proj, LoRALinear) and is_4bit(q_proj.weight) and q_proj.lora_A.dtype == torch.float32
    torch.nn.init.normal_(q_proj.lora_B)
    x = torch.randn(3, 32)
    expected = x @ dequantize_nf4(q_proj.weight).T + 2.0 * (x @ q_proj.lora_A.T @ q_proj.lora_B.T)
    assert torch.allclose(q_proj(x), expected, atol=1e-5)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 256, (2, 12))
    for _ in range(2):
        torch.nn.functional.cross_entropy(model.train()(idx)[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != ("lora_" in name), name  # only A and B move; W0 stays bit for bit
    with pytest.raises(ValueError, match="Cannot merge LoRA into a 4-bit W0"):
        merge_lora(model)
    with pytest.raises(ValueError, match="before applying LoRA"):
        quantize_blocks(apply_lora(micro_model()), "bnb.nf4")


@needs_bitsandbytes
def test_the_adapter_trains_on_a_4bit_base():
    from lit_lora.adapter import apply_adapter, mark_only_adapter_as_trainable

    model = quantize_blocks(micro_model(), "bnb.nf4-dq")
    apply_adapter(model, prompt_length=3, start_layer=1)
    mark_only_adapter_as_trainable(model)
    idx = torch.randint(0, 256, (2, 12))
    model.train()(idx).logsumexp(-1).mean().backward()
    gate = model.blocks[1].attn.gating_factor
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.blocks[1].attn.adaption_prompt.shape == (3, 32)


# ---------------------------------------------------------------------------------------------------------
# Loading layer by layer, the scripts, the LoRA file


@needs_bitsandbytes
def test_load_model_quantizes_from_the_memory_mapped_file(tmp_path, tokenizer_path):
    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path)
    plain, quantized = load_model(checkpoint_dir), load_model_4bit(checkpoint_dir, "bnb.nf4")
    assert quantized.quantization == "bnb.nf4" and quantized.base_fingerprint == plain.base_fingerprint
    for name, module in plain.blocks[1].named_modules():
        if type(module) is torch.nn.Linear:
            q = quantized.blocks[1].get_submodule(name)
            assert isinstance(q, Linear4bit) and torch.equal(dequantize_nf4(q.weight), nf4_reference(module.weight))
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert relative_rms(quantized(idx), nf4_reference_model(plain)(idx)) < 1e-5


@needs_bitsandbytes
def test_a_short_qlora_run_lowers_the_loss_and_its_lora_file_loads_on_both_bases(setup, tmp_path):
    from finetune.lora import main
    from generate.lora import LoRAGenerateArgs
    from generate.lora import main as generate

    checkpoint_dir, data_dir, _ = setup
    out_dir = tmp_path / "qlora"
    summary = main(lora_args(checkpoint_dir, data_dir, out_dir, max_steps=12, eval_interval=0, quantize="bnb.nf4"))
    losses = logged(out_dir, "loss")
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # it learns
    assert summary["total_parameters"] == num_parameters(apply_lora(load_model(checkpoint_dir), r=4,
                                                                    targets=("q", "v", "head")))
    lora_file = read_lora_file(out_dir / "lit_lora_finetuned.pth")
    assert lora_file["quantization"] == "bnb.nf4" and lora_file["lora_config"]["r"] == 4

    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        on_4bit = load_lora(load_model_4bit(checkpoint_dir, "bnb.nf4"), out_dir / "lit_lora_finetuned.pth").eval()
        on_plain = load_lora(load_model(checkpoint_dir), out_dir / "lit_lora_finetuned.pth").eval()
        merged = load_lora(load_model(checkpoint_dir), out_dir / "lit_lora_finetuned.pth").eval()
        merge_lora(merged)
        nf4_error = relative_rms(load_model_4bit(checkpoint_dir, "bnb.nf4")(idx), load_model(checkpoint_dir)(idx))
        assert relative_rms(on_plain(idx), on_4bit(idx)) < 2 * nf4_error  # the base's NF4 error, no more
        assert relative_rms(merged(idx), on_plain(idx)) < 1e-5

    texts = generate(LoRAGenerateArgs(checkpoint_dir=checkpoint_dir, lora_path=out_dir / "lit_lora_finetuned.pth",
                                      prompt="Say the word.", max_new_tokens=5, temperature=0.0, quantize="bnb.nf4"))
    assert len(texts) == 1 and isinstance(texts[0], str)

    # the other way: a LoRA file trained on the unquantized base loads on a 4-bit one
    plain_file = tmp_path / "plain.pth"
    save_lora(apply_lora(load_model(checkpoint_dir), r=2, targets=("q", "k")), plain_file)
    assert read_lora_file(plain_file)["quantization"] is None
    model = load_lora(load_model_4bit(checkpoint_dir, "bnb.nf4-dq"), plain_file)
    assert is_4bit(model.blocks[0].attn.k_proj.weight) and isinstance(model.blocks[0].attn.k_proj, LoRALinear)


@needs_bitsandbytes
def test_a_qlora_lora_file_exports_to_hugging_face_and_peft(setup, tmp_path):
    from lit_lora.convert.hf import export_hf_checkpoint
    from lit_lora.convert.peft import export_peft_adapter

    checkpoint_dir, _, _ = setup
    model = apply_lora(load_model_4bit(checkpoint_dir, "bnb.nf4"), r=2, targets=("q", "v"))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.1)
    save_lora(model, tmp_path / "qlora.pth")
    export_peft_adapter(tmp_path / "qlora.pth", tmp_path / "peft", checkpoint_dir)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    export_hf_checkpoint(checkpoint_dir, tmp_path / "hf", tmp_path / "qlora.pth")
    from safetensors.torch import load_file

    hf = load_file(tmp_path / "hf" / "model.safetensors")
    plain = load_lora(load_model(checkpoint_dir), tmp_path / "qlora.pth")
    merge_lora(plain)  # the export merges into the unquantized base: W0 + alpha/r B A
    assert torch.allclose(hf["model.layers.0.self_attn.q_proj.weight"], plain.blocks[0].attn.q_proj.weight)


@needs_bitsandbytes
def test_interrupt_and_resume_of_a_qlora_run_equal_an_uninterrupted_one(setup, monkeypatch):
    from finetune.lora import main

    checkpoint_dir, data_dir, tmp_path = setup
    run = dict(lora_dropout=0.1, max_steps=4, save_interval=2, eval_interval=2, quantize="bnb.nf4-dq")
    full = main(lora_args(checkpoint_dir, data_dir, tmp_path / "full", **run))
    module, name, call = INTERRUPTS["in the forward pass"]
    real = interrupt_at(monkeypatch, importlib.import_module(module), name, call)
    with pytest.raises(SystemExit):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "resumed", **run))
    monkeypatch.setattr(importlib.import_module(module), name, real)
    with pytest.raises(ValueError, match="--quantize differs from the saved run's"):
        main(lora_args(checkpoint_dir, data_dir, tmp_path / "resumed", resume="auto", **{**run, "quantize": None}))
    resumed = main(lora_args(checkpoint_dir, data_dir, tmp_path / "resumed", resume="auto", **run))
    assert resumed["steps"] == 2 and resumed["final_loss"] == full["final_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)


@needs_bitsandbytes
def test_generation_on_a_4bit_base_keeps_the_weights_4bit_in_any_precision(checkpoint_dir, monkeypatch):
    import lit_lora.chat as chat
    from generate.base import main
    from lit_lora.chat import GenerateArgs

    prepared = []
    real = chat.prepare_for_generation
    monkeypatch.setattr(chat, "prepare_for_generation", lambda *a, **k: prepared.append(real(*a, **k)) or prepared[-1])
    texts = main(GenerateArgs(checkpoint_dir=checkpoint_dir, prompt="The model", max_new_tokens=4, temperature=0.0,
                              precision="bf16-true", quantize="bnb.nf4"))
    (model,) = prepared
    assert isinstance(texts[0], str)
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.weight.dtype == torch.uint8 and model.embed.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Clear errors


def test_without_bitsandbytes_quantize_says_which_extra_to_install(monkeypatch, tmp_path):
    from finetune.lora import LoRAArgs
    from lit_lora.chat import GenerateArgs

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    for make in (lambda: LoRAArgs(quantize="bnb.nf4", out_dir=tmp_path / "out"),
                 lambda: GenerateArgs(quantize="bnb.nf4-dq")):
        with pytest.raises(ImportError, match=re.escape("needs bitsandbytes, which is not installed: "
                                                        "pip install -e '.[quantize]'")):
            make()
    LoRAArgs(out_dir=tmp_path / "out")  # without --quantize nothing needs it


def test_quantize_is_refused_with_full_finetuning_and_fsdp(tmp_path):
    from finetune.full import FullArgs
    from finetune.lora import LoRAArgs

    with pytest.raises(ValueError, match=re.escape("--quantize bnb.nf4: full finetuning trains every weight")):
        FullArgs(quantize="bnb.nf4", out_dir=tmp_path / "out")
    if bitsandbytes_imports():
        with pytest.raises(ValueError, match=re.escape("--quantize bnb.nf4: not with --strategy fsdp")):
            LoRAArgs(quantize="bnb.nf4", strategy="fsdp", out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# The memory estimate of QLoRA (lit_lora/memory.py)


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a parameter holds: a 4-bit weight's packed indices and its block scales (and, with double
    quantization, the scales' scales), else the tensor itself."""
    if not is_4bit(tensor):
        return tensor.numel() * tensor.element_size()
    state = tensor.quant_state
    scales = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        scales += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return tensor.numel() * tensor.element_size() + scales


@needs_bitsandbytes
@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_the_estimate_counts_the_4bit_weights_as_bitsandbytes_stores_them(mode):
    from lit_lora.memory import TrainingSetup, estimate_memory

    config = Config.from_name("micro")
    model = apply_lora(quantize_blocks(micro_model(), mode), r=8, targets=("q", "v"))
    estimate = estimate_memory(config, TrainingSetup(method="qlora", precision="32-true", quantize=mode))
    stored = sum(stored_bytes(p) for p in model.parameters())
    # nf4: exact. nf4-dq: the estimate counts 1/256 of an fp32 scale per block, bitsandbytes a whole one per
    # started group of 256 blocks: at most 4 bytes more per matrix (micro's matrices have 8 to 32 blocks)
    assert 0 <= stored - estimate.weights <= (0 if mode == "bnb.nf4" else 4 * 7 * config.n_layer)
    lora = estimate_memory(config, TrainingSetup(method="lora", precision="32-true"))
    assert (estimate.gradients, estimate.optimizer, estimate.activations) == (lora.gradients, lora.optimizer,
                                                                              lora.activations)


@needs_bitsandbytes
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_qlora_saves_for_the_backward_pass_what_lora_saves(precision):
    """The 4-bit matmul keeps only the 4-bit weight (a parameter) for the backward pass: autograd saves what it
    saves for LoRA, which memory.py's saved_tensors counts to the byte."""
    from lit_lora.memory import TrainingSetup, saved_tensors
    from tests.conftest import FAMILIES, saved_by_autograd

    torch.manual_seed(0)
    config = Config.from_name("7B", n_layer=3, block_size=64, vocab_size=256, **FAMILIES["7B"])
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    model = quantize_blocks(LLaMA(config).to(dtype), "bnb.nf4")
    apply_lora(model, r=4, alpha=8, dropout=0.05, targets=("q", "v", "down"))
    mark_only_lora_as_trainable(model)
    B, T = 2, 24
    input_ids = torch.randint(0, config.padded_vocab_size, (B, T))
    labels = input_ids.clone()
    labels[:, :10] = -100
    setup = TrainingSetup(method="qlora", precision=precision, micro_batch_size=B, seq_length=T, device="cpu",
                          label_fraction=2 * 14 / (B * T), lora_r=4, lora_targets=("q", "v", "down"))
    assert sum(saved_tensors(config, setup).values()) == saved_by_autograd(model.train(), input_ids, labels)


@needs_bitsandbytes
def test_compare_runs_qlora_beside_lora(setup, capsys):
    from finetune.compare import CompareArgs, main

    checkpoint_dir, data_dir, tmp_path = setup
    out_dir = tmp_path / "compare"
    result = main(CompareArgs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, methods=("lora", "qlora"),
                              max_steps=3, micro_batch_size=2, global_batch_size=4, precision="32-true", eval_examples=4,
                              warmup_steps=1))
    lora, qlora = result["results"]
    assert qlora["method"] == "qlora" and qlora["trainable_parameters"] == lora["trainable_parameters"]
    assert qlora["predicted_memory_bytes"] < lora["predicted_memory_bytes"] and qlora["tokens_per_sec"] > 0
    assert read_lora_file(out_dir / "qlora" / "lit_lora_finetuned.pth")["quantization"] == "bnb.nf4-dq"
    assert "| QLoRA |" in (out_dir / "results.md").read_text()
    assert "QLoRA vs LoRA:" in capsys.readouterr().out
    # evaluate/lora.py --quantize on the QLoRA run: its own test loss, beside the base model's and LoRA's
    assert [row["method"] for row in result["quality"]] == ["base", "lora", "qlora"]
    assert len({round(row["test_loss"], 6) for row in result["quality"]}) == 3


def test_a_quantized_full_finetuning_ends_the_script_with_one_line_and_exit_code_2(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "LIT_LORA_TRACEBACK"}
    result = subprocess.run([sys.executable, "finetune/full.py", "--quantize", "bnb.nf4", "--out_dir", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --quantize bnb.nf4: full finetuning trains every weight, and a 4-bit weight cannot train; "
        "use finetune/lora.py --quantize bnb.nf4 (QLoRA)")


@needs_bitsandbytes
def test_loading_in_4_bits_with_a_dtype_holds_one_converted_weight_at_a_time(tmp_path, tokenizer_path, monkeypatch):
    """load_model_4bit(dtype=...) converts each Block weight just before quantizing it and drops the converted copy
    before the next: the converted model never exists whole (it once did, referenced until loading returned)."""
    import weakref

    import lit_lora.quantize as quantize

    checkpoint_dir = make_checkpoint(tmp_path / "base", tokenizer_path)
    alive_at_each_call, converted = [], []
    real = quantize.quantize_nf4

    def spy(weight, *args, **kwargs):
        alive_at_each_call.append(sum(ref() is not None for ref in converted))
        converted.append(weakref.ref(weight))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_nf4", spy)
    model = load_model_4bit(checkpoint_dir, "bnb.nf4", dtype=torch.bfloat16)
    assert len(converted) == 7 * model.config.n_layer and max(alive_at_each_call) == 0
    assert model.embed.weight.dtype == torch.bfloat16 and model.blocks[0].attn.q_proj.weight.quant_state.dtype == torch.bfloat16
