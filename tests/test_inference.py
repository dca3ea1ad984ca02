"""The fused, transposed layout for decoding (lit_lora/inference.py) computes what model.py computes."""

import copy

import pytest
import torch

from lit_lora.adapter import apply_adapter
from lit_lora.generation import generate
from lit_lora.inference import (
    FusedAttention,
    FusedMLP,
    TransposedLinear,
    fuse_for_inference,
)
from lit_lora.lora import LoRALinear, apply_lora, merge_lora
from lit_lora.model import Config, LLaMA

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


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_model_decodes_the_same_tokens(name):
    plain = random_model(CONFIGS[name])
    fused = fuse_for_inference(copy.deepcopy(plain))
    assert all(isinstance(block.attn, FusedAttention) and isinstance(block.mlp, FusedMLP) for block in fused.blocks)
    assert isinstance(fused.lm_head, TransposedLinear) != plain.config.tie_embeddings  # tied: left shared
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


def test_generate_scripts_decode_the_same_text_fused_or_not(checkpoint_dir, capsys):
    from lit_lora.generation import GenerateArgs, run_generation
    from lit_lora.utils import load_model

    texts = {fused: run_generation(load_model(checkpoint_dir), GenerateArgs(
        checkpoint_dir=checkpoint_dir, prompt="The model", max_new_tokens=20, temperature=0.0, precision="32-true",
        fused=fused)) for fused in (True, False)}
    assert texts[True] == texts[False] and texts[True][0]


def test_a_linear_with_a_bias_is_left_unfused():
    """The fused forms compute x W^T only: a layer with a bias (none in LLaMA, but a model may be given one) stays."""
    model = random_model(CONFIGS["grouped-query (micro)"])
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.padded_vocab_size))
    prompt = [torch.tensor([1, 5, 9, 13])]
    expected = generate(model, prompt, max_new_tokens=10)[0].tolist()
    fused = fuse_for_inference(model)
    assert type(fused.lm_head) is torch.nn.Linear and isinstance(fused.blocks[0].mlp, FusedMLP)
    assert generate(fused, prompt, max_new_tokens=10)[0].tolist() == expected
