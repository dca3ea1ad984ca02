"""The fused, transposed layout for decoding (lit_lora/inference.py) computes what model.py computes."""

import copy

import pytest
import torch

from lit_lora.adapter import apply_adapter
from lit_lora.generation import generate, generate_stream
from lit_lora.inference import (
    FusedAttention,
    FusedMLP,
    FusedRMSNorm,
    Projection,
    compile_decoding,
    fuse_for_inference,
    matvec,
    rope_rolled,
)
from lit_lora.lora import LoRALinear, apply_lora, merge_lora
from lit_lora.model import Config, KVCache, LLaMA, RMSNorm, apply_rope, build_rope_cache

CONFIGS = {
    "multi-head (tiny)": Config.from_name("tiny"),
    "grouped-query (micro)": Config.from_name("micro"),
    "one key/value head": Config.from_name("micro", n_query_groups=1),
    "tied, Llama 3 RoPE": Config.from_name("micro", tie_embeddings=True, rope_base=500000, block_size=128,
                                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_context=64)),
}


def random_model(config: Config, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(config).eval()
    with torch.no_grad():  # weights large enough that a wrong fusion would change the tokens
        for param in model.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.fill_(1.0)
    return model


@pytest.mark.parametrize("for_compile", [False, True], ids=["transposed", "for compile"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_model_decodes_the_same_tokens(name, for_compile):
    plain = random_model(CONFIGS[name])
    fused = fuse_for_inference(copy.deepcopy(plain), for_compile)
    assert all(isinstance(block.attn, FusedAttention) and isinstance(block.mlp, FusedMLP) for block in fused.blocks)
    assert isinstance(fused.lm_head, Projection)
    # tied: shared with the embedding, never copied; for compile: every weight as model.py stores it
    assert fused.lm_head.transposed == (not plain.config.tie_embeddings and not for_compile)
    assert fused.blocks[0].attn.qkv.transposed == fused.blocks[0].mlp.down.transposed == (not for_compile)
    if plain.config.tie_embeddings:
        assert fused.lm_head.stored.data_ptr() == fused.embed.weight.data_ptr()
    assert all(isinstance(norm, FusedRMSNorm) for norm in (fused.norm, fused.blocks[0].attn_norm, fused.blocks[-1].mlp_norm))
    idx = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fused(idx), plain(idx), atol=1e-5, rtol=1e-5)
    # greedy decoding of a batch of prompts of different lengths: token for token
    prompts = [idx[0, :12], idx[1, :5]]
    assert [t.tolist() for t in generate(fused, prompts, max_new_tokens=30)] == \
        [t.tolist() for t in generate(plain, prompts, max_new_tokens=30)]


def test_what_is_not_model_py_s_own_is_left_unfused_and_still_decodes_the_same():
    base = random_model(CONFIGS["grouped-query (micro)"])
    adapter = apply_adapter(copy.deepcopy(base), prompt_length=3, start_layer=1).eval()
    with torch.no_grad():
        for block in adapter.blocks[1:]:
            block.attn.gating_factor.fill_(0.5)  # open the gate, so the adapter changes the answer
    unmerged = apply_lora(copy.deepcopy(base), r=2, targets=("q", "v", "down")).eval()
    with torch.no_grad():
        for module in unmerged.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.2)
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    prompt = [torch.tensor([1, 5, 9, 13])]
    for model in (adapter, unmerged, merged):
        expected = generate(model, prompt, max_new_tokens=20)[0].tolist()
        assert generate(fuse_for_inference(model), prompt, max_new_tokens=20)[0].tolist() == expected
    assert type(adapter.blocks[1].attn).__name__ == "AdapterAttention"  # its attention stays as it is
    assert isinstance(adapter.blocks[0].attn, FusedAttention) and isinstance(adapter.blocks[1].mlp, FusedMLP)
    assert not isinstance(unmerged.blocks[0].attn, FusedAttention)  # an unmerged LoRA layer is not fused away
    assert isinstance(merged.blocks[0].attn, FusedAttention)  # merged: plain linear weights again, fused


def test_generate_scripts_decode_the_same_text_fused_compiled_or_not(checkpoint_dir, capsys):
    from lit_lora.chat import GenerateArgs, run_generation
    from lit_lora.checkpoint import load_model

    texts = {(fused, compile): run_generation(load_model(checkpoint_dir), GenerateArgs(
        checkpoint_dir=checkpoint_dir, prompt="The model", max_new_tokens=20, temperature=0.0, precision="32-true",
        fused=fused, compile=compile, num_samples=2 if compile else 1)) for fused, compile in
        ((True, False), (False, False), (True, True))}
    assert texts[True, False] == texts[False, False] == texts[True, True][:1] and texts[True, False][0]
    err = capsys.readouterr().err
    assert "first token after" in err and "then " in err  # the prefill and the decoding steps timed apart
    # --compile: the first sample's first step compiles, reported apart; the second sample reuses it
    assert err.count("compiling the decoding step") == 1 and "Sample 2: " in err


def test_a_linear_with_a_bias_is_left_unfused():
    """The fused forms compute x W^T only: a layer with a bias (none in LLaMA, but a model may be given one) stays."""
    model = random_model(CONFIGS["grouped-query (micro)"])
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.padded_vocab_size))
    prompt = [torch.tensor([1, 5, 9, 13])]
    expected = generate(model, prompt, max_new_tokens=10)[0].tolist()
    fused = fuse_for_inference(model)
    assert type(fused.lm_head) is torch.nn.Linear and isinstance(fused.blocks[0].mlp, FusedMLP)
    assert generate(fused, prompt, max_new_tokens=10)[0].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shorter_rope_and_rmsnorm_give_model_py_s_numbers_bit_for_bit(dtype):
    """rope_rolled and FusedRMSNorm are the same arithmetic in fewer operations: equal, not merely close."""
    torch.manual_seed(0)
    B, T, heads, hs = 2, 5, 3, 16
    cos, sin = build_rope_cache(32, hs)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])  # each row at its own positions, as when decoding
    x = torch.randn(B, T, heads, hs, dtype=dtype)
    sign = torch.tensor([-1.0] * (hs // 2) + [1.0] * (hs // 2))
    expected = apply_rope(x.transpose(1, 2), cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    actual = rope_rolled(x, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), sign).transpose(1, 2)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    # the training layout: (T, hs) cos/sin shared by the rows
    assert torch.equal(rope_rolled(x, cos[:T], sin[:T], sign).transpose(1, 2), apply_rope(x.transpose(1, 2), cos[:T], sin[:T]))

    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(B, T, 64, dtype=dtype) * 3
    assert torch.equal(FusedRMSNorm(norm)(x), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_writes_each_row_at_its_positions_in_either_form_of_input_pos(dtype):
    """KVCache.update writes positions shared by every row ((T,) or (1, T): one copy along the sequence) exactly
    where it writes them given row by row ((B, T)): for a prefill, a decoding step and a batch."""
    torch.manual_seed(0)
    for B, positions in ((1, [0, 1, 2, 3, 4]), (1, [7]), (3, [2, 3])):
        shared, per_row = (KVCache(B, 2, 12, 8, dtype=dtype) for _ in range(2))
        k, v = torch.randn(2, B, 2, len(positions), 8)  # fp32 written into a cache of `dtype`
        for input_pos in (torch.tensor(positions), torch.tensor([positions])):
            shared_k, shared_v = shared.update(input_pos, k, v)
        per_row_k, per_row_v = per_row.update(torch.tensor([positions] * B), k, v)
        assert shared_k is shared.k and shared.k.dtype == dtype
        assert torch.equal(shared_k, per_row_k) and torch.equal(shared_v, per_row_v)
        assert torch.equal(shared_k[:, :, positions], k.to(dtype)) and shared.k.abs().sum() > 0


@pytest.mark.parametrize("name", ["grouped-query (micro)", "tied, Llama 3 RoPE"])
def test_a_compiled_decoding_step_decodes_the_same_tokens_and_reports_its_compilation(name):
    """--compile: torch.compile of the one-token step only (the prefill stays eager), its one-row products as loops
    over the weights (matvec); the same greedy tokens as model.py, for two prompt lengths with one KV cache length
    (one compilation), and the time it took is counted apart."""
    plain = random_model(CONFIGS[name])
    compiled = compile_decoding(fuse_for_inference(copy.deepcopy(plain), for_compile=True))
    for prompt in (torch.tensor([1, 5, 9, 13]), torch.tensor([2, 4, 6, 8, 10, 12])):
        expected = generate(plain, [prompt], max_new_tokens=20)[0].tolist()
        compiled.set_kv_cache(batch_size=1, max_seq_length=32)
        tokens = [int(t) for t in generate_stream(compiled, [prompt], max_new_tokens=20)]
        compiled.clear_kv_cache()
        assert tokens == expected
        if len(prompt) == 4:
            first_compilation = compiled.compile_seconds
            assert first_compilation > 0
    assert compiled.compile_seconds == first_compilation  # same shapes: compiled once


@pytest.mark.parametrize("d_in", [64, 40])  # 16 lanes; 40 is not a multiple of 16: one running sum per row
def test_matvec_compiled_is_x_w_transposed(d_in):
    """matvec, as torch.compile runs it, is the product F.linear computes (to fp32 rounding: it adds in another
    order), for one row in any of the shapes a decoding step has."""
    torch.manual_seed(0)
    weight = torch.randn(48, d_in)
    compiled = torch.compile(matvec, dynamic=False, fullgraph=True)
    for shape in ((d_in,), (1, d_in), (1, 1, d_in)):
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, weight)
        actual = compiled(x, weight)
        assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
