import math

import pytest
import torch

from lit_lora.adapter import (
    AdapterAttention,
    AdapterConfig,
    adapter_state_dict,
    apply_adapter,
    mark_only_adapter_as_trainable,
)
from lit_lora.checkpoint import load_model
from lit_lora.files import atomic_save
from lit_lora.method_files import load_adapter, read_adapter_file, save_adapter
from lit_lora.model import Config, LLaMA
from lit_lora.report import num_parameters


def micro_model(seed=0, **overrides):  # micro has grouped-query attention: 4 query heads, 2 key/value heads
    torch.manual_seed(seed)
    return LLaMA(Config.from_name("micro", **overrides)).eval()


def randomize_adapter(model, seed=1):
    """Random prompts and non-zero gates, so the adapter actually changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_fresh_adapter_equals_base_model_exactly(name):
    torch.manual_seed(0)
    model = LLaMA(Config.from_name(name)).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(idx)
        apply_adapter(model, prompt_length=10, start_layer=1)
        adapted = model(idx)
    assert isinstance(model.blocks[1].attn, AdapterAttention) and not isinstance(model.blocks[0].attn, AdapterAttention)
    assert torch.equal(adapted, base)  # zero-init gating: bit for bit
    randomize_adapter(model)
    with torch.no_grad():
        assert (model(idx) - base).abs().max().item() > 1e-3  # ...and the adapter is really in the forward pass


def test_adapter_attention_matches_the_papers_formula():
    """attend(q, k, v) = causal attention + g * softmax(q (P W_k)^T / sqrt(hs)) P W_v, per head, with GQA."""
    model = apply_adapter(micro_model(), prompt_length=3, start_layer=0)
    randomize_adapter(model)
    attn = model.blocks[0].attn
    B, T, hs, n_head, groups = 2, 5, attn.head_size, attn.n_head, attn.n_query_groups
    q, k, v = torch.randn(B, n_head, T, hs), torch.randn(B, groups, T, hs), torch.randn(B, groups, T, hs)

    def softmax_attention(q, k, v, causal):  # the textbook formula, one head at a time
        scores = q @ k.T / math.sqrt(hs)
        if causal:
            scores = scores.masked_fill(torch.ones(len(q), len(k)).triu(1).bool(), float("-inf"))
        return scores.softmax(dim=-1) @ v

    prompt_k = (attn.adaption_prompt @ attn.k_proj.weight.T).view(3, groups, hs)
    prompt_v = (attn.adaption_prompt @ attn.v_proj.weight.T).view(3, groups, hs)
    expected = torch.empty(B, n_head, T, hs)
    with torch.no_grad():
        for b in range(B):
            for h in range(n_head):
                g = h // (n_head // groups)  # the key/value head this query head shares
                expected[b, h] = softmax_attention(q[b, h], k[b, g], v[b, g], causal=True) + attn.gating_factor[
                    0, h, 0, 0
                ] * softmax_attention(q[b, h], prompt_k[:, g], prompt_v[:, g], causal=False)
        actual = attn.attend(q, k, v, mask=None)
    assert (actual - expected).abs().max().item() < 1e-5


def test_only_the_adapter_trains():
    model = apply_adapter(micro_model(), prompt_length=4, start_layer=1).train()
    mark_only_adapter_as_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1.attn.adaption_prompt", "blocks.1.attn.gating_factor"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # All parameters go to the optimizer: the frozen ones must stay put because they get no gradient.
    # No weight decay, so a parameter moves only if its gradient is non-zero.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    idx = torch.randint(0, 256, (2, 12))

    def step():
        optimizer.zero_grad()
        logits = model(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()

    attn = model.blocks[1].attn
    # Step 1: the gate is 0, so the output does not depend on the prompt (d out / d prompt = g * ... = 0):
    # the prompt's gradient is exactly zero and only the gate moves. This is the zero-init design.
    step()
    assert torch.equal(attn.adaption_prompt.grad, torch.zeros_like(attn.adaption_prompt))
    assert torch.equal(attn.adaption_prompt, before["blocks.1.attn.adaption_prompt"])
    assert not torch.equal(attn.gating_factor, before["blocks.1.attn.gating_factor"])
    # Step 2: the gate is open now, so the prompt gets a gradient and moves too.
    step()
    assert not torch.equal(attn.adaption_prompt, before["blocks.1.attn.adaption_prompt"])
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_parameter_count_7B_on_meta_device():
    with torch.device("meta"):
        model = apply_adapter(LLaMA(Config.from_name("7B")), prompt_length=10, start_layer=2)
    base = 6_738_415_616  # LLaMA 7B
    assert num_parameters(model) == base + 1_229_760  # 30 layers * (10 prompt vectors * 4096 + 32 gates)
    mark_only_adapter_as_trainable(model)
    assert num_parameters(model, trainable=True) == 1_229_760
    assert model.adapter_config == AdapterConfig(prompt_length=10, start_layer=2)


def test_parameter_count_micro():
    model = apply_adapter(micro_model(), prompt_length=7, start_layer=1)
    c = model.config
    expected = (c.n_layer - 1) * (7 * c.n_embd + c.n_head)
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == expected == 1 * (7 * 32 + 4)


def count_prompt_projections(model):
    """Wrap every adapter layer's compute_prompt_kv to count its calls."""
    calls = []
    for block in model.blocks:
        if isinstance(block.attn, AdapterAttention):
            compute = block.attn.compute_prompt_kv
            block.attn.compute_prompt_kv = lambda compute=compute: calls.append(1) or compute()
    return calls


def decode(model, idx, prefill=4):
    """Logits of a prefill, then one token at a time through the model's KV cache."""
    steps = [model(idx[:, :prefill], torch.arange(prefill))]
    for pos in range(prefill, idx.size(1)):
        steps.append(model(idx[:, pos : pos + 1], torch.tensor([pos])))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_kv_cache_decoding_equals_full_forward_and_projects_the_prompt_once(n_query_groups):
    model = apply_adapter(micro_model(n_query_groups=n_query_groups), prompt_length=5, start_layer=0)
    randomize_adapter(model)
    calls = count_prompt_projections(model)
    idx = torch.randint(0, 256, (3, 14))
    with torch.no_grad():
        full = model(idx)
        assert len(calls) == 2  # no KV cache (training): computed every forward, in both layers
        model.set_kv_cache(batch_size=3, max_seq_length=16)
        incremental = decode(model, idx)
        assert len(calls) == 2 + 2  # 11 forwards with the cache, one projection per layer
        cached = model.blocks[0].attn.kv_cache.adapter_kv[0]
        model(idx[:, :1], torch.tensor([0]))
        assert model.blocks[0].attn.kv_cache.adapter_kv[0] is cached  # the very same tensor is reused
    assert (incremental - full).abs().max().item() < 1e-5

    # A new generation after the prompt changed: new caches must not serve the old prompt's keys/values.
    randomize_adapter(model, seed=2)
    with torch.no_grad():
        model.clear_kv_cache()
        full = model(idx)
        model.set_kv_cache(batch_size=3, max_seq_length=16)
        incremental = decode(model, idx)
    assert len(calls) == 4 + 2 + 2  # the full forward (no cache), then once per layer for the new cache
    assert (incremental - full).abs().max().item() < 1e-5
    randomize_adapter(model, seed=3)  # replacing the cache without clearing it recomputes too
    with torch.no_grad():
        full = model(idx[:, :4])  # this forward, with the (old) cache set, uses the cached, stale prompt...
        model.set_kv_cache(batch_size=3, max_seq_length=16)
        fresh = model(idx[:, :4], torch.arange(4))
        model.clear_kv_cache()
        reference = model(idx[:, :4])
    assert (fresh - reference).abs().max().item() < 1e-5
    assert (full - reference).abs().max().item() > 1e-3  # ...as documented: change weights between generations


def test_save_load_round_trip(tmp_path, checkpoint_dir):
    model = apply_adapter(load_model(checkpoint_dir), prompt_length=6, start_layer=1).eval()
    randomize_adapter(model)
    path = tmp_path / "out" / "adapter.pth"
    save_adapter(model, path)
    data = read_adapter_file(path)
    assert set(data["adapter"]) == {"blocks.1.attn.adaption_prompt", "blocks.1.attn.gating_factor"}
    assert data["adapter_config"] == {"prompt_length": 6, "start_layer": 1}
    assert data["base_config"]["n_embd"] == model.config.n_embd
    assert [p.name for p in path.parent.iterdir()] == ["adapter.pth"]  # no temporary file left behind

    loaded = load_adapter(load_model(checkpoint_dir), path).eval()
    assert loaded.adapter_config == AdapterConfig(prompt_length=6, start_layer=1)
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # loading into a model that already has the same adapter (e.g. to reset it) works too
    load_adapter(loaded, path)


def test_load_names_what_does_not_fit(tmp_path):
    model = apply_adapter(micro_model(), prompt_length=6, start_layer=1)
    path = tmp_path / "adapter.pth"
    save_adapter(model, path)

    with pytest.raises(ValueError, match=r"n_embd is 32, this model's is 64"):
        load_adapter(micro_model(n_embd=64), path)
    with pytest.raises(ValueError, match=r"n_query_groups is 2, this model's is 4"):
        load_adapter(micro_model(n_query_groups=4), path)
    other = apply_adapter(micro_model(), prompt_length=3, start_layer=1)
    with pytest.raises(ValueError, match="already has one"):
        load_adapter(other, path)

    data = read_adapter_file(path)
    data["adapter"]["blocks.1.attn.adaption_prompt"] = torch.zeros(5, 32)
    atomic_save(data, tmp_path / "bad_shape.pth")
    fresh = micro_model()
    shapes = r"blocks\.1\.attn\.adaption_prompt has shape \(5, 32\), expected \(6, 32\)"
    with pytest.raises(ValueError, match=shapes):
        load_adapter(fresh, tmp_path / "bad_shape.pth")
    assert not hasattr(fresh, "adapter_config")  # checked before touching the model: nothing was applied

    data = read_adapter_file(path)
    del data["adapter"]["blocks.1.attn.gating_factor"]
    data["adapter"]["blocks.0.attn.gating_factor"] = torch.zeros(1, 4, 1, 1)
    atomic_save(data, tmp_path / "bad_keys.pth")
    with pytest.raises(ValueError, match=r"missing tensors: \['blocks.1.attn.gating_factor'\]; unexpected: \['blocks.0"):
        load_adapter(micro_model(), tmp_path / "bad_keys.pth")

    atomic_save({"not": "an adapter"}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an adapter file"):
        read_adapter_file(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_adapter_file(tmp_path / "missing.pth")


def test_misuse_is_explained():
    model = micro_model()
    with pytest.raises(ValueError, match="apply_adapter"):
        mark_only_adapter_as_trainable(model)
    with pytest.raises(ValueError, match=r"^start_layer=2: must be below the model's n_layer \(2\)"):  # the parameter
        apply_adapter(model)  # micro has 2 layers: the default start_layer leaves nothing to adapt
    apply_adapter(model, start_layer=1)
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_adapter(model, start_layer=1)
    with pytest.raises(ValueError, match="prompt_length"):
        AdapterConfig(prompt_length=0)
