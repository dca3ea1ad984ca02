"""The fused, transposed layout for decoding (lit_lora/inference.py) computes what model.py computes."""

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

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
    decoding_key,
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


# ---------------------------------------------------------------------------------------------------------
# The decoding step compiled ahead of time and kept (--compile): one real compilation, shared by the tests below

KV = Config.from_name("micro").block_size  # the KV cache the generate scripts give the micro model: its context


def decode(model, prompt: torch.Tensor, kv_length: int, n: int = 12) -> list[int]:
    """Greedy tokens as the generate scripts decode them: a KV cache of `kv_length`, the prefill, then steps."""
    model.set_kv_cache(batch_size=1, max_seq_length=kv_length)
    try:
        with torch.no_grad():
            return [int(t) for t in generate_stream(model, [prompt], max_new_tokens=n)]
    finally:
        model.clear_kv_cache()


@pytest.fixture(scope="module")
def kept_step(tmp_path_factory, tokenizer_path):
    """generate with --compile true, two samples, into an empty cache folder: (checkpoint, cache, texts, stderr)."""
    from tests.conftest import make_checkpoint
    from lit_lora.chat import GenerateArgs, run_generation
    from lit_lora.checkpoint import load_model

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("compiled") / "checkpoint", tokenizer_path)
    cache, err = tmp_path_factory.mktemp("cache"), io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        env.setenv("LIT_LORA_CACHE", str(cache))
        texts = run_generation(load_model(checkpoint), GenerateArgs(
            checkpoint_dir=checkpoint, prompt="The model", max_new_tokens=20, temperature=0.0, precision="32-true",
            compile=True, num_samples=2))
    return checkpoint, cache, texts, err.getvalue()


def test_generate_scripts_decode_the_same_text_compiled_eager_or_unfused(kept_step, capsys):
    from lit_lora.chat import GenerateArgs, run_generation
    from lit_lora.checkpoint import load_model

    checkpoint, cache, compiled_texts, err = kept_step
    texts = {fused: run_generation(load_model(checkpoint), GenerateArgs(
        checkpoint_dir=checkpoint, prompt="The model", max_new_tokens=20, temperature=0.0, precision="32-true",
        fused=fused, compile=False)) for fused in (True, False)}
    assert texts[True] == texts[False] == compiled_texts[:1] == compiled_texts[1:] and texts[True][0]
    eager_err = capsys.readouterr().err
    assert "first token after" in eager_err and "then " in eager_err  # the prefill and the decoding steps timed apart
    assert "ompil" not in eager_err  # --compile false: nothing compiled, nothing said about it
    # --compile true: announced, compiled once (the first sample's first step, its time reported apart), kept
    assert err.count(f"Compiling the decoding step for batch 1, {KV} positions, torch.float32") == 1
    assert err.count("after compiling the decoding step in") == 1 and "Sample 2: " in err
    (folder,) = (cache / "decoding").iterdir()  # one package, no temporary folder left
    assert sorted(path.name for path in folder.iterdir()) == ["key.json", "step.pt2"]
    key = json.loads((folder / "key.json").read_text())
    assert key["torch"] == torch.__version__ and key["tensors"]["blocks.0.attn.kv_cache.k"][0][2] == KV


def test_a_kept_step_is_loaded_by_a_later_run_and_serves_other_weights(kept_step, monkeypatch, capsys):
    """The package holds no weights: a model of the same shapes with other weights (another finetune) loads it,
    compiles nothing, and decodes its own tokens: the eager model's, for prompts of two lengths (one package)."""
    from lit_lora.checkpoint import load_model

    checkpoint, cache, _, _ = kept_step
    monkeypatch.setenv("LIT_LORA_CACHE", str(cache))
    other = load_model(checkpoint).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # weights large enough that a step reading the old ones would decode other tokens
        for param in other.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.fill_(1.0)
    compiled = compile_decoding(fuse_for_inference(copy.deepcopy(other), for_compile=True))
    for prompt in (torch.tensor([1, 5, 9, 13]), torch.tensor([2, 4, 6, 8, 10, 12, 14])):
        assert decode(compiled, prompt, KV) == decode(other, prompt, KV)
    assert decode(load_model(checkpoint).eval(), prompt, KV) != decode(other, prompt, KV)  # other tokens indeed
    assert compiled.compile_seconds == 0.0
    err = capsys.readouterr().err
    assert err.count(f"Decoding with the compiled step for batch 1, {KV} positions") == 1 and "loaded in" in err
    assert "Warning" not in err and len(list((cache / "decoding").iterdir())) == 1


def fake_build(good_folder: Path, calls: list):
    """In place of build_package: copy a package built earlier (as a rebuild would write it) and load it."""
    import lit_lora.inference as inference

    def build(step, idx, input_pos, folder, key):
        calls.append(folder)
        shutil.copytree(good_folder, folder)
        assert (folder / "key.json").read_text() == key
        return inference.load_package(folder / "step.pt2")
    return build


@pytest.mark.parametrize("damage", ["truncated", "other torch", "missing key"])
def test_a_damaged_or_foreign_kept_step_is_never_used_and_is_rebuilt_with_one_warning(kept_step, damage, tmp_path,
                                                                                     monkeypatch, capsys):
    import lit_lora.inference as inference
    from lit_lora.checkpoint import load_model

    checkpoint, cache, _, _ = kept_step
    (good,) = (cache / "decoding").iterdir()
    shutil.copytree(good, tmp_path / "decoding" / good.name)
    bad = tmp_path / "decoding" / good.name
    if damage == "truncated":
        data = (bad / "step.pt2").read_bytes()
        (bad / "step.pt2").write_bytes(data[: len(data) // 2])
    elif damage == "other torch":  # a folder whose key says it was made by another torch (a copied cache)
        key = json.loads((bad / "key.json").read_text())
        (bad / "key.json").write_text(json.dumps({**key, "torch": "2.0.0"}, sort_keys=True, indent=1))
    else:
        (bad / "key.json").unlink()
    monkeypatch.setenv("LIT_LORA_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(inference, "build_package", fake_build(good, calls))
    model = load_model(checkpoint).eval()
    compiled = compile_decoding(fuse_for_inference(copy.deepcopy(model), for_compile=True))
    prompt = torch.tensor([1, 5, 9, 13])
    assert decode(compiled, prompt, KV) == decode(compiled, prompt, KV) == decode(model, prompt, KV)
    err = capsys.readouterr().err
    assert err.count("Warning") == 1 and f"the compiled decoding step in {bad} cannot be used" in err
    assert "compiling it again" in err and calls == [bad]  # rebuilt once, then used
    assert (bad / "key.json").read_text() == (good / "key.json").read_text()


def test_the_key_names_torch_the_cpu_the_code_and_the_shapes_but_not_the_weights(kept_step, monkeypatch):
    import lit_lora.inference as inference
    from lit_lora.checkpoint import load_model

    checkpoint = kept_step[0]

    def key(model, kv_length=KV, batch=1):
        model.set_kv_cache(batch_size=batch, max_seq_length=kv_length)
        return json.dumps(decoding_key(model, torch.zeros(batch, 1, dtype=torch.long),
                                       torch.zeros(batch, 1, dtype=torch.long)), sort_keys=True)

    model = fuse_for_inference(load_model(checkpoint).eval(), for_compile=True)
    reference = key(model)
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights.blocks[0].mlp.down.stored.add_(1.0)
    assert key(other_weights) == reference  # weights are bound on load, never compiled in
    assert key(model, kv_length=KV // 2) != reference and key(model, batch=2) != reference
    assert key(copy.deepcopy(model).to(torch.bfloat16)) != reference
    assert key(fuse_for_inference(load_model(checkpoint).eval(), for_compile=False)) != reference  # another layout
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert key(model) != reference  # another CPU
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert key(model) != reference
    monkeypatch.undo()
    monkeypatch.setattr(inference, "__file__", __file__)  # inference.py's code is hashed into the key
    assert key(model) != reference  # other code


def test_a_build_that_fails_leaves_nothing_behind_and_decodes_eagerly_said_once(checkpoint_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """A full disk (or no C++ compiler) while compiling: no half-written package, one warning, the eager tokens."""
    from lit_lora.checkpoint import load_model

    def full_disk(program, package_path, **kwargs):
        Path(package_path).write_bytes(b"PK\x03\x04 half a package")
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("LIT_LORA_CACHE", str(tmp_path))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", full_disk)
    model = load_model(checkpoint_dir).eval()
    compiled = compile_decoding(fuse_for_inference(copy.deepcopy(model), for_compile=True))
    prompt = torch.tensor([1, 5, 9, 13])
    assert decode(compiled, prompt, 64) == decode(compiled, prompt, 64) == decode(model, prompt, 64)
    err = capsys.readouterr().err
    assert err.count("Warning: could not compile the decoding step (OSError: [Errno 28] No space left") == 1
    assert list((tmp_path / "decoding").iterdir()) == []  # the temporary folder removed


def test_compile_auto_decodes_a_small_model_eagerly_and_a_large_one_with_its_kept_step(kept_step, monkeypatch, capsys):
    """--compile auto (the default): a model below 50M parameters decodes eagerly, as with --compile false, nothing
    said or compiled; a large one (here: every model, the threshold lowered) loads the step kept for its shapes."""
    import lit_lora.inference as inference
    from lit_lora.chat import GenerateArgs, prepare_for_generation
    from lit_lora.checkpoint import load_model

    checkpoint, cache, _, _ = kept_step
    assert GenerateArgs().compile == "auto"
    monkeypatch.setenv("LIT_LORA_CACHE", str(cache))
    prompt = torch.tensor([1, 5, 9, 13])
    expected = decode(load_model(checkpoint).eval(), prompt, KV)
    small = prepare_for_generation(load_model(checkpoint), "32-true", compile="auto")
    assert not hasattr(small, "compile_seconds") and small.blocks[0].attn.qkv.transposed  # the eager layout
    assert decode(small, prompt, KV) == expected and capsys.readouterr().err == ""
    monkeypatch.setattr(inference, "AUTO_COMPILE_PARAMETERS", 1)
    large = prepare_for_generation(load_model(checkpoint), "32-true", compile="auto")
    assert decode(large, prompt, KV) == decode(large, prompt, KV) == expected and large.compile_seconds == 0.0
    assert capsys.readouterr().err.count("Decoding with the compiled step") == 1
    with pytest.raises(ValueError, match="--compile True: cannot compile a 4-bit base"):
        GenerateArgs(compile=True, quantize="bnb.nf4")


def test_compile_auto_decodes_a_4bit_base_eagerly(checkpoint_dir, monkeypatch):
    """--compile auto never compiles a 4-bit base (its layers are not exported), however large the model."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quantize]')")
    import lit_lora.inference as inference
    from lit_lora.chat import prepare_for_generation
    from lit_lora.quantize import load_model_4bit

    monkeypatch.setattr(inference, "AUTO_COMPILE_PARAMETERS", 1)  # every model large enough
    model = prepare_for_generation(load_model_4bit(checkpoint_dir, "bnb.nf4"), "32-true", compile="auto")
    assert not hasattr(model, "compile_seconds")
