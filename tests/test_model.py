import re

import pytest
import torch

from lit_lora.checkpoint import load_model, read_config, write_config
from lit_lora.model import Config, LLaMA, apply_rope, build_rope_cache
from lit_lora.report import num_parameters


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LLaMA(Config.from_name("micro", **overrides)).eval()


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_causality(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    idx = torch.randint(0, 256, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max().item() < 1e-6  # the past never sees the future
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max().item() > 1e-3  # ...but the future sees the change


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_kv_cache_token_by_token_equals_full_forward(n_query_groups):
    model = tiny_model(n_query_groups=n_query_groups)
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=3, max_seq_length=32)
        # a prefill of 5 tokens, then one token at a time
        steps = [model(idx[:, :5], torch.arange(5))]
        for pos in range(5, 20):
            steps.append(model(idx[:, pos : pos + 1], torch.tensor([pos])))
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape == (3, 20, 256)
    assert (incremental - full).abs().max().item() < 1e-5


def test_kv_cache_with_positions_per_row():
    """(B, T) positions: each row of the batch writes and attends at its own positions."""
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=16)
        model(idx[:, :6], torch.arange(6))
        # row 0 advances to position 6, row 1 re-feeds position 5 (overwriting it with the same token)
        out = model(torch.stack([idx[0, 6:7], idx[1, 5:6]]), torch.tensor([[6], [5]]))
    assert (out[0, 0] - full[0, 6]).abs().max().item() < 1e-5
    assert (out[1, 0] - full[1, 5]).abs().max().item() < 1e-5


def test_kv_cache_is_explicit():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    model.set_kv_cache(1, 8)
    assert model.blocks[0].attn.kv_cache.k.shape == (1, 2, 8, 8)  # (B, n_query_groups, max_seq_length, head_size)
    model.clear_kv_cache()
    assert all(block.attn.kv_cache is None for block in model.blocks)
    with pytest.raises(ValueError, match="longer than the context"):
        model.set_kv_cache(1, 65)


def test_rope_preserves_norm_and_depends_on_relative_distance():
    head_size = 16
    cos, sin = build_rope_cache(64, head_size)
    torch.manual_seed(0)
    q, k = torch.randn(head_size), torch.randn(head_size)

    def at(x, pos):
        return apply_rope(x, cos[pos], sin[pos])

    for pos in (0, 5, 63):
        assert torch.allclose(at(q, pos).norm(), q.norm(), atol=1e-5)
    # q at m, k at n: the score depends only on m - n
    for distance in (0, 3, 17):
        scores = torch.tensor([at(q, n + distance) @ at(k, n) for n in (0, 7, 30)])
        assert (scores - scores[0]).abs().max().item() < 1e-4
    by_distance = torch.tensor([at(q, d) @ at(k, 0) for d in range(12)])
    assert by_distance.max() - by_distance.min() > 0.1  # ...and does depend on it
    assert torch.equal(at(q, 0), q)  # position 0 is no rotation


@pytest.mark.parametrize(
    "name, expected",
    [
        ("7B", 6_738_415_616),
        ("13B", 13_015_864_320),
        ("Llama-2-7b", 6_738_415_616),
        ("Llama-2-70b", 68_976_648_192),
        ("TinyLlama-1.1B", 1_100_048_384),
    ],
)
def test_preset_parameter_counts_on_meta_device(name, expected):
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    assert num_parameters(model) == expected


def test_presets_and_shapes():
    c = Config.from_name("7B")
    assert (c.intermediate_size, c.padded_vocab_size, c.n_query_groups, c.head_size) == (11008, 32000, 32, 128)
    c = Config.from_name("Llama-2-70b")
    assert (c.n_query_groups, c.block_size, c.intermediate_size) == (8, 4096, 28672)
    tiny = Config.from_name("tiny")
    with torch.device("meta"):
        n = num_parameters(LLaMA(tiny))
    assert 300_000 <= n <= 5_000_000 and tiny.vocab_size >= 256
    with pytest.raises(ValueError, match="Known presets: 7B"):
        Config.from_name("8B")


def test_config_file_round_trip(tmp_path):
    c = Config.from_name("TinyLlama-1.1B", block_size=1024)
    write_config(c, tmp_path / "model_config.json")
    assert read_config(tmp_path / "model_config.json") == c
    (tmp_path / "bad.json").write_text('{"n_layer": 2, "n_layers": 3}')
    with pytest.raises(ValueError, match="n_layers"):
        read_config(tmp_path / "bad.json")


@pytest.mark.parametrize("text, message", [
    ('{"n_layer": 2.5}', "n_layer is 2.5: must be a whole number, at least 1"),
    ('{"n_head": "4"}', "n_head is '4': must be a whole number"),
    ('{"n_layer": true}', "n_layer is True: must be a whole number"),
    ('{"norm_eps": NaN}', "norm_eps is nan: must be a positive, finite number"),
    ('{"rope_base": -1}', "rope_base is -1: must be a positive, finite number"),
    ('{"rope_scaling": "llama3"}', "rope_scaling is 'llama3': must be null or hold factor, low_freq_factor, "),
    ('{"rope_scaling": {"factor": -8, "low_freq_factor": 1, "high_freq_factor": 4, "original_context": 8192}}',
     "factor is -8: must be a positive, finite number"),
    ('{"n_embd": 36, "n_head": 4}', r"n_embd is 36: must be divisible by 2 n_head \(8\)"),
    ('{"tie_embeddings": "yes"}', "tie_embeddings is 'yes': must be true or false"),
    ('{"n_layer": 2,}', "is not valid JSON"),
    ('[1, 2]', "holds a JSON list, not an object"),
])
def test_a_config_file_with_a_value_it_cannot_hold_is_named(tmp_path, text, message):
    """Every field of model_config.json is checked when it is read: a wrong type, NaN or an impossible value is one
    error naming the file and the field, never a model that computes garbage."""
    path = tmp_path / "model_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{message}"):
        read_config(path)


def test_init_for_training_from_scratch():
    model = LLaMA(Config.from_name("tiny"))
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / (2 * model.config.n_layer) ** 0.5
    assert abs(model.blocks[1].mlp.down_proj.weight.std().item() - expected) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_load_model_from_checkpoint_folder(checkpoint_dir):
    model = load_model(checkpoint_dir).eval()
    reference_state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    reference = LLaMA(model.config).eval()
    reference.load_state_dict(reference_state)
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx))
    assert model.cos.device.type == "cpu" and not model.cos.is_meta


def test_load_model_names_what_is_missing(tmp_path, checkpoint_dir):
    with pytest.raises(FileNotFoundError, match="does not exist.*convert_hf.py"):
        load_model(tmp_path / "nowhere")
    (checkpoint_dir / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.model"):
        load_model(checkpoint_dir)


def test_logits_at_computes_only_the_wanted_logits():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3], mask[1, 7:] = True, True
    with torch.no_grad():
        full, some = model(idx), model(idx, logits_at=mask)
    assert some.shape == (4, 256)
    assert torch.allclose(some, full[mask], atol=1e-6)


# Published sizes of today's LLaMA-architecture models, and the shape of each in transformers' terms.
PUBLISHED = {
    "Llama-3.2-1B": (1_235_814_400, dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                         tie_word_embeddings=True)),
    "Llama-3.2-3B": (3_212_749_824, dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                         tie_word_embeddings=True)),
    "Llama-3.1-8B": (8_030_261_248, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                         tie_word_embeddings=False)),
    "SmolLM2-135M": (134_515_008, dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                       tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_todays_presets_have_their_published_sizes(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_lora.memory import TrainingSetup, count_parameters

    published, hf_shape = PUBLISHED[name]
    config = Config.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in LLaMA(config).parameters())
        theirs = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**hf_shape)).parameters())
    assert ours == theirs == published
    assert count_parameters(config, TrainingSetup(method="full")) == (published, published)  # memory.py's arithmetic


def test_llama3_rope_scaling_matches_transformers():
    """Llama 3.1's frequency scaling keeps the high frequencies, slows the low ones by `factor` and blends between."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lit_lora.model import llama3_scaled_frequencies

    config = Config.from_name("Llama-3.1-8B")
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    theta = 1.0 / (500000 ** (torch.arange(0, 128, 2).float() / 128))
    ours = llama3_scaled_frequencies(theta, **config.rope_scaling)
    assert torch.allclose(ours, hf_inv_freq.float(), rtol=1e-6, atol=0)
    assert torch.equal(ours[:10], theta[:10]) and torch.equal(ours[-10:], theta[-10:] / 8)  # kept; slowed down


def test_rope_computes_in_the_activations_dtype_whether_cos_and_sin_were_cast_or_kept_in_fp32():
    """One rule, Hugging Face's: cos and sin are computed in fp32 and rounded to the activations' dtype where they
    are applied. A bf16 model gives the same logits with the cache cast by model.to(bf16) (as in training) and with
    the cache rebuilt in fp32 (as loading does), so training and generation compute alike."""
    model = tiny_model(block_size=512).to(torch.bfloat16).eval()
    idx = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        cast = model(idx)
        model.reset_rope_cache()  # back to fp32
        assert model.cos.dtype == torch.float32
        rebuilt = model(idx)
    assert torch.equal(cast, rebuilt)
