"""checkpoints/: Hugging Face and Meta weights -> lit-lora -> Hugging Face, all on tiny random models made here.

The references are independent of lit_lora/convert_*.py: transformers' own LlamaForCausalLM for the Hugging Face
format, and for Meta's format the names, shard split and interleaved RoPE written out below from Meta's model.py.
"""

import importlib.util
import inspect
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import get_args

import huggingface_hub
import pytest
import sentencepiece as spm
import tokenizers
import torch
import torch.nn as nn
from huggingface_hub.utils import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RevisionNotFoundError,
)
from jsonargparse import CLI
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lit_lora.checkpoint import load_model, read_config, save_checkpoint_dir
from lit_lora.convert.common import DTYPES, DtypeName
from lit_lora.convert.hf import (
    config_from_hf,
    convert_hf_checkpoint,
    export_hf_checkpoint,
    hf_files_to_download,
)
from lit_lora.convert.meta import convert_meta_checkpoint, permute_meta_qk
from lit_lora.convert.peft import export_peft_adapter, import_peft_adapter
from lit_lora.generation import generate
from lit_lora.lora import apply_lora
from lit_lora.method_files import load_lora, read_lora_file, save_lora
from lit_lora.model import Config, LLaMA, apply_rope, build_rope_cache
from lit_lora.tokenizer import Tokenizer
from tests.conftest import make_checkpoint, make_corpus, run_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(  # the libraries' own deprecation notes, not ours
    "ignore::FutureWarning", "ignore:Setting `save_embedding_layers`:UserWarning")


def run_script(name: str, *args: str):
    """Run checkpoints/<name>.py's command line in this process: the flags as a user types them."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "checkpoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return CLI(module.main, as_positional=False, args=[str(a) for a in args])


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that any mix-up (a swapped name, a wrong permutation, a norm left out) shows in the
    logits; norms away from 1 so they count too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return model.eval()


def hf_model(vocab_size: int, n_kv_heads: int = 4, hidden: int = 64, intermediate: int = 128, rope_theta: float = 500.0,
             seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=n_kv_heads,
                         intermediate_size=intermediate, vocab_size=vocab_size, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(config), seed)


def save_hf_bin(model: LlamaForCausalLM, folder: Path, n_shards: int) -> None:
    """The .bin layout of Hugging Face repos (what save_pretrained(safe_serialization=False) wrote before
    transformers 5): pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin shards and their index. Like old
    checkpoints, it also holds the rotary_emb.inv_freq buffers, which conversion must skip."""
    model.config.save_pretrained(folder)
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state_dict["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if n_shards == 1:
        torch.save(state_dict, folder / "pytorch_model.bin")
        return
    names = list(state_dict)
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = names[i::n_shards]
        torch.save({name: state_dict[name] for name in part}, folder / shard)
        weight_map.update({name: shard for name in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in state_dict.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def make_hf_dir(folder: Path, model: LlamaForCausalLM, tokenizer_path: Path, fmt: str = "safetensors",
                sharded: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder, max_shard_size="40KB" if sharded else "50GB")
    else:
        save_hf_bin(model, folder, n_shards=3 if sharded else 1)
    (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return folder


def same_logits(hf: LlamaForCausalLM, lit: LLaMA, vocab_size: int) -> float:
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf(idx).logits - lit.eval()(idx)).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face -> lit
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_checkpoint_converts_to_the_same_logits(tmp_path, tokenizer_path, tokenizer, fmt, sharded, n_kv_heads,
                                                   capsys):
    hf = hf_model(tokenizer.vocab_size, n_kv_heads)
    hf_dir = make_hf_dir(tmp_path / "org" / "tiny-llama", hf, tokenizer_path, fmt, sharded)
    index = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}[fmt]
    assert (hf_dir / index).is_file() == sharded
    hf_files = sorted(p.name for p in hf_dir.iterdir())

    run_script("convert_hf", "--hf_dir", hf_dir)  # by default the lit files go beside the Hugging Face ones

    assert sorted(p.name for p in hf_dir.iterdir()) == sorted({*hf_files, "checksums.json", "lit_model.pth",
                                                               "model_config.json"})
    lit = load_model(hf_dir)
    config = lit.config
    assert (config.n_query_groups, config.rope_base, config.norm_eps, config.block_size) == (n_kv_heads, 500, 1e-5, 128)
    assert config.padded_vocab_size == config.vocab_size == tokenizer.vocab_size
    assert config.name == "tiny-llama"
    assert same_logits(hf, lit, tokenizer.vocab_size) < 1e-4
    out = capsys.readouterr().out
    n_files = len(list(hf_dir.glob(f"*.{fmt}")))
    assert n_files > 1 if sharded else n_files == 1
    assert f"[{n_files}/{n_files}]" in out and "peak memory" in out


def test_convert_hf_dtype_and_output_dir(tmp_path, tokenizer_path, tokenizer):
    hf = hf_model(tokenizer.vocab_size)
    hf_dir = make_hf_dir(tmp_path / "hf", hf, tokenizer_path)
    out = convert_hf_checkpoint(hf_dir, tmp_path / "lit", dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "lit_model.pth", "model_config.json",
                                                     "tokenizer.model"]
    state_dict = torch.load(out / "lit_model.pth", weights_only=True)
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}
    expected = hf.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(state_dict["blocks.1.mlp.down_proj.weight"], expected)
    assert not list(tmp_path.glob(".lit.*"))  # the temporary folder is gone


def test_model_name_preset_names_the_model_and_must_agree(tmp_path, tokenizer_path, tokenizer):
    # The shapes of the `micro` preset: 32 wide, 4 heads in 2 key/value groups, SwiGLU 64, RoPE base 10000.
    hf = hf_model(tokenizer.vocab_size, n_kv_heads=2, hidden=32, intermediate=64, rope_theta=10000.0)
    hf_dir = make_hf_dir(tmp_path / "hf", hf, tokenizer_path)
    out = convert_hf_checkpoint(hf_dir, tmp_path / "lit", model_name="micro")
    config = read_config(out / "model_config.json")
    assert (config.name, config.block_size, config.vocab_size) == ("micro", 64, tokenizer.vocab_size)  # not 128
    assert same_logits(hf, load_model(out), tokenizer.vocab_size) < 1e-4
    with pytest.raises(ValueError, match=r"'tiny' does not match \S*hf/config.json: its n_layer is 4, \S*config.json says 2"):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit2", model_name="tiny")


# ----------------------------------------------------------------------------------------------------------------
# Meta -> lit
# ----------------------------------------------------------------------------------------------------------------

# Meta's names for lit-lora's tensors, and how fairscale's model parallelism splits them (Meta's model.py):
# ColumnParallelLinear splits its output rows (dim 0), RowParallelLinear its input columns (dim 1),
# ParallelEmbedding its embedding columns (dim 1); the RMSNorm weights are whole in every shard.
META_NAMES = {
    "embed.weight": ("tok_embeddings.weight", 1), "norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
    "attn_norm.weight": ("attention_norm.weight", None), "mlp_norm.weight": ("ffn_norm.weight", None),
    "attn.q_proj.weight": ("attention.wq.weight", 0), "attn.k_proj.weight": ("attention.wk.weight", 0),
    "attn.v_proj.weight": ("attention.wv.weight", 0), "attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0), "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
}


def to_meta_layout(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our rotate-half query/key rows -> Meta's interleaved ones: within a head, row c * hs/2 + j -> row 2j + c."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def make_meta_dir(folder: Path, model: LLaMA, tokenizer_path: Path, n_shards: int = 2) -> Path:
    """llama/tokenizer.model + llama/<size>/consolidated.0i.pth + params.json, as Meta's download lays them out."""
    c = model.config
    shards = [{"rope.freqs": torch.rand(c.head_size // 2)} for _ in range(n_shards)]  # a buffer the original saved
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        local = ".".join(parts[2:]) if parts[0] == "blocks" else name
        meta_name, dim = META_NAMES[local]
        if parts[0] == "blocks":
            meta_name = f"layers.{parts[1]}.{meta_name}"
        if local == "attn.q_proj.weight":
            tensor = to_meta_layout(tensor, c.n_head)
        elif local == "attn.k_proj.weight":
            tensor = to_meta_layout(tensor, c.n_query_groups)
        pieces = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[meta_name] = piece.clone()
    model_dir = folder / "7B"
    model_dir.mkdir(parents=True)
    for i, shard in enumerate(shards):
        torch.save(shard, model_dir / f"consolidated.{i:02d}.pth")
    # micro's SwiGLU size, 64, by Meta's formula: int(2 * 4 * 32 / 3) = 85, * 0.75 = 63, rounded up to 64.
    params = {"dim": c.n_embd, "n_layers": c.n_layer, "n_heads": c.n_head, "n_kv_heads": c.n_query_groups,
              "multiple_of": 64, "ffn_dim_multiplier": 0.75, "norm_eps": c.norm_eps, "vocab_size": -1}
    (model_dir / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())  # beside the model folders
    return model_dir


def test_meta_checkpoint_in_two_shards_converts_to_the_same_weights(tmp_path, tokenizer_path, tokenizer):
    vocab = tokenizer.vocab_size
    model = randomize(LLaMA(Config.from_name("micro", vocab_size=vocab, padded_vocab_size=vocab)))
    meta_dir = make_meta_dir(tmp_path / "llama", model, tokenizer_path)
    run_script("convert_meta", "--meta_dir", meta_dir, "--model_size", "micro", "--output_dir", tmp_path / "lit")
    converted = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    for name in expected:
        assert torch.equal(converted[name], expected[name]), name
    config = read_config(tmp_path / "lit" / "model_config.json")
    assert (config.name, config.vocab_size, config.intermediate_size, config.n_query_groups) == ("micro", vocab, 64, 2)


def test_meta_checkpoint_must_match_model_size(tmp_path, tokenizer_path, tokenizer):
    vocab = tokenizer.vocab_size
    model = LLaMA(Config.from_name("micro", vocab_size=vocab, padded_vocab_size=vocab))
    meta_dir = make_meta_dir(tmp_path / "llama", model, tokenizer_path)
    with pytest.raises(ValueError, match="'tiny' does not match params.json: its n_layer is 4, params.json says 2"):
        convert_meta_checkpoint(meta_dir, tmp_path / "lit", "tiny")


def test_meta_permutation_gives_the_same_attention_scores_as_interleaved_rope():
    """Meta's model.py rotates the pairs (x0, x1), (x2, x3), ... of each head as complex numbers; ours rotates
    (x_i, x_{i+hs/2}). With the permuted weights both give the same q . k for every pair of positions."""
    torch.manual_seed(0)
    T, d, n_head, n_kv, hs, base = 10, 32, 4, 2, 8, 10000
    x = torch.randn(T, d)
    wq, wk = torch.randn(n_head * hs, d), torch.randn(n_kv * hs, d)

    def meta_rope(t):  # (T, heads, hs): Meta's apply_rotary_emb
        freqs = 1.0 / base ** (torch.arange(0, hs, 2).float() / hs)
        cis = torch.polar(torch.ones(T, hs // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hs/2)
        pairs = torch.view_as_complex(t.reshape(T, t.size(1), hs // 2, 2))
        return torch.view_as_real(pairs * cis.unsqueeze(1)).flatten(-2)

    def scores(q, k):  # (T, n_head, hs), (T, n_kv, hs) -> (n_head, T, T)
        return torch.einsum("thd,shd->hts", q, k.repeat_interleave(n_head // n_kv, dim=1))

    meta = scores(meta_rope((x @ wq.T).view(T, n_head, hs)), meta_rope((x @ wk.T).view(T, n_kv, hs)))
    cos, sin = build_rope_cache(T, hs, base)
    q = apply_rope((x @ permute_meta_qk(wq, n_head).T).view(T, n_head, hs).transpose(0, 1), cos, sin).transpose(0, 1)
    k = apply_rope((x @ permute_meta_qk(wk, n_kv).T).view(T, n_kv, hs).transpose(0, 1), cos, sin).transpose(0, 1)
    assert torch.allclose(scores(q, k), meta, atol=1e-4)
    unpermuted = apply_rope((x @ wq.T).view(T, n_head, hs).transpose(0, 1), cos, sin).transpose(0, 1)
    assert not torch.allclose(scores(unpermuted, k), meta, atol=1e-1)  # without the permutation it is wrong


# ----------------------------------------------------------------------------------------------------------------
# lit -> Hugging Face
# ----------------------------------------------------------------------------------------------------------------

def make_lit_checkpoint(folder: Path, tokenizer_path: Path, tokenizer) -> LLaMA:
    """A random micro model whose embedding is padded (vocab 320 -> 384 rows), as models trained here are."""
    model = randomize(LLaMA(Config.from_name("micro", vocab_size=tokenizer.vocab_size, padding_multiple=128)))
    assert model.config.padded_vocab_size > tokenizer.vocab_size
    save_checkpoint_dir(folder, model.state_dict(), model.config, [tokenizer_path])
    return model


def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path, tokenizer_path, tokenizer):
    model = make_lit_checkpoint(tmp_path / "lit", tokenizer_path, tokenizer)
    run_script("export_hf", "--checkpoint_dir", tmp_path / "lit", "--output_dir", tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer.model", "tokenizer_config.json"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == model.config.padded_vocab_size
    assert same_logits(hf, model, tokenizer.vocab_size) < 1e-4
    # and back: the exported folder converts to the model we started from
    back = config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()), model_name="micro")
    assert (back.n_query_groups, back.padded_vocab_size, back.rope_base) == (2, 384, 10000)

    export_hf_checkpoint(tmp_path / "lit", tmp_path / "hf16", dtype="bfloat16")
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# Text where a tokenizer can go wrong: spaces at the start, at the end and doubled, newlines and tabs, digits (one
# token each), characters outside the vocabulary (written as bytes), text that looks like a piece, and no text at all.
HARD_STRINGS = [
    "", " ", "  ", "Hello world", " Hello", "Hello ", "  two  spaces  ", "   leading", "trailing   ", "a\nb", "\n",
    "\n\nx\n", "  \n  ", "line1\r\nline2", "\ttab", "12345 + 678 = 999", "3.14159", "x1y22z333", "café naïve résumé",
    "日本語のテキスト", "😀 emoji 👍🏽", "Ω≈ç√∫", "\u200b zero width", "\x00\x01 control", "a" * 50, "ﬁ Ａ",
    "<0x0A> looks like a byte", "▁ already a meta space", "@#$%^&*()_+{}|:\"<>?",
    "The quick brown fox jumps over the lazy dog: 12 + 34 = 46.",
    "### Instruction:\nWrite a response.\n\n### Response:",
]


def train_sentencepiece(prefix: Path, vocab_size: int, **changes) -> Path:
    """A tokenizer trained with Tokenizer.train's options, but with more pieces (the shared one has only 10
    merges) or with `changes` to the options."""
    corpus = make_corpus(2000, seed=1) + ["def f(x):\n    return x  +  1", "    indented  code", "naïve café 日本語"] * 20
    options = dict(model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, normalization_rule_name="identity",
                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=vocab_size,
                                   **{**options, **changes})
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def tokenizer_paths(tmp_path_factory, tokenizer_path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"shared": tokenizer_path,
            "1000 pieces": train_sentencepiece(folder / "large", vocab_size=1000),
            "no dummy prefix": train_sentencepiece(folder / "no_prefix", vocab_size=600, add_dummy_prefix=False)}


@pytest.mark.parametrize("name", ["shared", "1000 pieces", "no dummy prefix"])
def test_exported_tokenizer_gives_lit_lora_ids_in_transformers(tmp_path, tokenizer_paths, name, capsys):
    """AutoTokenizer on the export (no protobuf, no network) encodes and decodes as lit-lora's Tokenizer does."""
    lit_tokenizer = Tokenizer(tokenizer_paths[name])
    make_checkpoint(tmp_path / "lit", tokenizer_paths[name])
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "hf")
    assert "Warning" not in capsys.readouterr().err
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer_paths[name].read_bytes()  # kept

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer_json = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))  # as other tools read it
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (lit_tokenizer.bos_id, lit_tokenizer.eos_id)
    assert len(hf_tokenizer) == lit_tokenizer.vocab_size
    for text in HARD_STRINGS:
        ids = lit_tokenizer.encode(text, bos=True).tolist()
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert tokenizer_json.encode(text).ids == ids, text
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == lit_tokenizer.decode(ids), text
        assert tokenizer_json.decode(ids) == lit_tokenizer.decode(ids), text
    hf_ids = hf_tokenizer(HARD_STRINGS)["input_ids"]  # a batch, as training code calls it
    assert hf_ids == [lit_tokenizer.encode(text).tolist() for text in HARD_STRINGS]


def test_export_warns_when_the_tokenizer_changes_text(tmp_path, capsys):
    """A tokenizer that normalizes text (NFKC, extra spaces removed) cannot be written as this tokenizer.json:
    the export says so instead of pretending."""
    path = train_sentencepiece(tmp_path / "nfkc", vocab_size=600, normalization_rule_name="nmt_nfkc",
                               remove_extra_whitespaces=True)
    make_checkpoint(tmp_path / "lit", path)
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "hf")
    err = capsys.readouterr().err
    assert f"Warning: {tmp_path / 'lit' / 'tokenizer.model'} changes text before splitting it" in err
    assert "transformers will give other ids than lit-lora" in err


# ----------------------------------------------------------------------------------------------------------------
# LoRA -> merged Hugging Face model, LoRA <-> PEFT adapter
# ----------------------------------------------------------------------------------------------------------------

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "head")


def make_lora(tmp_path: Path, tokenizer_path: Path, tokenizer, targets=ALL_TARGETS) -> LLaMA:
    """A base checkpoint in tmp_path/lit and a LoRA for it in tmp_path/lora.pth, with B != 0 as after training."""
    model = make_lit_checkpoint(tmp_path / "lit", tokenizer_path, tokenizer)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=targets)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    save_lora(model, tmp_path / "lora.pth")
    return model.eval()


def test_export_hf_merges_the_lora(tmp_path, tokenizer_path, tokenizer):
    lora_model = make_lora(tmp_path, tokenizer_path, tokenizer)
    base_bytes = (tmp_path / "lit" / "lit_model.pth").read_bytes()
    run_script("export_hf", "--checkpoint_dir", tmp_path / "lit", "--lora_path", tmp_path / "lora.pth",
               "--output_dir", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert same_logits(hf, lora_model, tokenizer.vocab_size) < 1e-4
    base = load_model(tmp_path / "lit")
    assert same_logits(hf, base, tokenizer.vocab_size) > 1e-2  # the LoRA changed the function ...
    assert (tmp_path / "lit" / "lit_model.pth").read_bytes() == base_bytes  # ... but not the base checkpoint


def test_lora_exported_to_peft_loads_in_peft_and_imports_back(tmp_path, tokenizer_path, tokenizer):
    lora_model = make_lora(tmp_path, tokenizer_path, tokenizer)
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "hf")  # the base model, in Hugging Face format
    run_script("export_peft", "--lora_path", tmp_path / "lora.pth", "--output_dir", tmp_path / "peft",
               "--checkpoint_dir", tmp_path / "lit")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "lm_head"]
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (4, 8, 0.1)
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in f.keys()
        assert "base_model.model.lm_head.lora_A.weight" in f.keys()

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "peft").eval()
    assert same_logits(peft_model, lora_model, tokenizer.vocab_size) < 1e-4

    run_script("import_peft", "--peft_dir", tmp_path / "peft", "--checkpoint_dir", tmp_path / "lit",
               "--output_path", tmp_path / "imported.pth")
    original, imported = read_lora_file(tmp_path / "lora.pth"), read_lora_file(tmp_path / "imported.pth")
    assert imported["lora_config"] == original["lora_config"]
    assert imported["base_config"] == original["base_config"]
    assert imported["lora"].keys() == original["lora"].keys()
    for name, tensor in original["lora"].items():
        assert torch.equal(imported["lora"][name], tensor), name


def test_adapter_trained_with_peft_imports_with_the_same_logits(tmp_path, tokenizer_path, tokenizer):
    """An adapter written by peft itself (here: random B, as after training) on our exported base."""
    make_lit_checkpoint(tmp_path / "lit", tokenizer_path, tokenizer)
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "hf")
    peft_config = LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["k_proj", "up_proj", "lm_head"],
                             task_type="CAUSAL_LM")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), peft_config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")

    import_peft_adapter(tmp_path / "peft", tmp_path / "lit", tmp_path / "imported.pth")
    lit = load_lora(load_model(tmp_path / "lit"), tmp_path / "imported.pth")
    assert lit.lora_config.targets == ("k", "up", "head") and lit.lora_config.alpha == 6
    assert same_logits(peft_model.eval(), lit, tokenizer.vocab_size) < 1e-4


def test_peft_adapter_names_a_base_model_that_loads_offline(tmp_path, tokenizer_path, tokenizer, capsys):
    """AutoPeftModelForCausalLM loads the base model from base_model_name_or_path: the Hugging Face folder the base
    was converted from, or --checkpoint_dir if transformers can load it; never a preset name, which it would look
    for on the Hub."""
    hf = hf_model(tokenizer.vocab_size)
    hf_dir = make_hf_dir(tmp_path / "hf", hf, tokenizer_path)
    convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    model = apply_lora(load_model(tmp_path / "lit"), r=2, alpha=4, targets=("q", "v"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    save_lora(model, tmp_path / "lora.pth")
    run_script("export_peft", "--lora_path", tmp_path / "lora.pth", "--output_dir", tmp_path / "peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(hf_dir.resolve())
    assert f"base model: {hf_dir.resolve()}" in capsys.readouterr().out
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert same_logits(peft_model, model.eval(), tokenizer.vocab_size) < 1e-4

    # --base_model_name_or_path wins (a repo id, to share the adapter)
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft_shared", base_model_name_or_path="org/tiny-llama")
    assert json.loads((tmp_path / "peft_shared" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "org/tiny-llama"


def test_peft_adapter_of_an_unknown_base_model_says_so(tmp_path, tokenizer_path, tokenizer, capsys):
    make_lora(tmp_path, tokenizer_path, tokenizer)  # its base (preset "micro") was made here, not converted
    for checkpoint_dir in (None, tmp_path / "lit"):  # lit/ holds no config.json: transformers cannot load it
        export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft", checkpoint_dir=checkpoint_dir)
        assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
        err = capsys.readouterr().err
        assert "Warning: the Hugging Face base model of this LoRA is unknown" in err
        assert "--base_model_name_or_path" in err

    # once the base is exported beside it, --checkpoint_dir is a folder AutoPeftModelForCausalLM loads
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "lit")
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft", checkpoint_dir=tmp_path / "lit")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "lit").resolve())
    assert "Warning" not in capsys.readouterr().err
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert same_logits(peft_model, load_lora(load_model(tmp_path / "lit"), tmp_path / "lora.pth"),
                       tokenizer.vocab_size) < 1e-4


@pytest.mark.parametrize("field, value", [("use_dora", True), ("use_rslora", True), ("target_modules", "all-linear"),
                                          ("target_modules", ["q_proj", "embed_tokens"]), ("peft_type", "IA3"),
                                          ("rank_pattern", {"q_proj": 16})])
def test_unsupported_peft_adapter_field_is_named(tmp_path, tokenizer_path, tokenizer, field, value):
    make_lora(tmp_path, tokenizer_path, tokenizer, targets=("q", "v"))
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json: {field} = "):
        import_peft_adapter(tmp_path / "peft", tmp_path / "lit", tmp_path / "imported.pth")
    assert not (tmp_path / "imported.pth").exists()


def test_export_peft_checks_the_base_model(tmp_path, tokenizer_path, tokenizer):
    make_lora(tmp_path, tokenizer_path, tokenizer)
    other = tmp_path / "other"
    wider = LLaMA(Config.from_name("micro", vocab_size=tokenizer.vocab_size, n_embd=64))
    save_checkpoint_dir(other, wider.state_dict(), wider.config, [tokenizer_path])
    with pytest.raises(ValueError, match="trained on another base model .*: its n_embd is 32, .*other's is 64"):
        export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft", checkpoint_dir=other)


def test_peft_adapter_that_does_not_fit_the_base_model_is_named(tmp_path, tokenizer_path, tokenizer):
    """The adapter's tensors are checked under their PEFT names, those a user finds in adapter_model.safetensors."""
    make_lora(tmp_path, tokenizer_path, tokenizer, targets=("q", "v"))
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft")
    q_factor = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wider = tmp_path / "wider"
    wider_model = LLaMA(Config.from_name("micro", vocab_size=tokenizer.vocab_size, n_embd=64))
    save_checkpoint_dir(wider, wider_model.state_dict(), wider_model.config, [tokenizer_path])
    with pytest.raises(ValueError, match=re.escape(f"{q_factor} has shape (4, 32), expected (4, 64)")):
        import_peft_adapter(tmp_path / "peft", wider, tmp_path / "imported.pth")

    adapter_path = tmp_path / "peft" / "adapter_model.safetensors"
    with safe_open(str(adapter_path), framework="pt") as adapter_file:
        tensors = {key: adapter_file.get_tensor(key) for key in adapter_file.keys() if key != q_factor}
    save_file(tensors, str(adapter_path))
    with pytest.raises(ValueError, match=re.escape(f"does not fit: missing tensors: ['{q_factor}']")):
        import_peft_adapter(tmp_path / "peft", tmp_path / "lit", tmp_path / "imported.pth")
    assert not (tmp_path / "imported.pth").exists()


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_written_folders_and_files_have_the_usual_permissions(tmp_path, tokenizer_path, tokenizer, umask,
                                                              folder_mode, file_mode):
    """Under umask 022 every folder written is drwxr-xr-x and its files -rw-r--r--, as with mkdir and cp: the
    temporary folder they are written into first is made owner-only by mkdtemp, and must not pass that on."""
    previous_umask = os.umask(umask)
    try:
        hf_dir = make_hf_dir(tmp_path / "hf", hf_model(tokenizer.vocab_size), tokenizer_path)
        vocab = tokenizer.vocab_size
        meta_dir = make_meta_dir(tmp_path / "llama", LLaMA(Config.from_name("micro", vocab_size=vocab,
                                                                            padded_vocab_size=vocab)), tokenizer_path)
        make_lora(tmp_path, tokenizer_path, tokenizer)  # tmp_path/lit and tmp_path/lora.pth
        folders = [convert_hf_checkpoint(hf_dir, tmp_path / "converted_hf"),
                   convert_meta_checkpoint(meta_dir, tmp_path / "converted_meta", "micro"),
                   export_hf_checkpoint(tmp_path / "lit", tmp_path / "exported_hf"),
                   export_peft_adapter(tmp_path / "lora.pth", tmp_path / "exported_peft")]
        convert_hf_checkpoint(hf_dir)  # into the existing Hugging Face folder: its files are moved in
        import_peft_adapter(tmp_path / "exported_peft", tmp_path / "lit", tmp_path / "imported.pth")
    finally:
        os.umask(previous_umask)
    files = [file for folder in folders for file in folder.iterdir()]
    files += [hf_dir / "lit_model.pth", hf_dir / "model_config.json", tmp_path / "imported.pth"]
    assert {str(folder): oct(stat.S_IMODE(folder.stat().st_mode)) for folder in folders} == {
        str(folder): oct(folder_mode) for folder in folders}
    assert {str(file): oct(stat.S_IMODE(file.stat().st_mode)) for file in files} == {
        str(file): oct(file_mode) for file in files}


# ----------------------------------------------------------------------------------------------------------------
# Errors that name what is wrong
# ----------------------------------------------------------------------------------------------------------------

VALID_HF_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 128, "vocab_size": 320, "hidden_act": "silu"}


@pytest.mark.parametrize("field, value", [
    ("model_type", "mistral"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0}),  # without its factors
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
])
def test_unsupported_hf_config_field_is_named(field, value):
    assert config_from_hf(VALID_HF_CONFIG).n_embd == 64  # the valid config converts
    with pytest.raises(ValueError, match=f"config.json: {field}"):
        config_from_hf({**VALID_HF_CONFIG, field: value})


def test_hf_folder_errors(tmp_path, tokenizer_path, tokenizer):
    hf = hf_model(tokenizer.vocab_size)
    empty = tmp_path / "empty"
    empty.mkdir()
    hf.config.save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="No weights in .*model.safetensors.*pytorch_model.bin"):
        convert_hf_checkpoint(empty)

    hf_dir = make_hf_dir(tmp_path / "sharded", hf, tokenizer_path, "safetensors", sharded=True)
    with pytest.raises(ValueError, match="dtype 'int8': choose one of float32, float16, bfloat16"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out", dtype="int8")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists the shard {shard.name}, which is not in"):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")

    no_tokenizer = make_hf_dir(tmp_path / "no_tokenizer", hf, tokenizer_path)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="No tokenizer in .*no_tokenizer: a checkpoint folder holds tokenizer.model .* or tokenizer.json"):
        convert_hf_checkpoint(no_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("field, value, expected", [
    ("num_hidden_layers", 3, "missing tensors: ['blocks.2.attn.k_proj.weight', 'blocks.2.attn.o_proj.weight', "),
    ("intermediate_size", 96, "blocks.0.mlp.down_proj.weight has shape (64, 128), expected (64, 96)"),
])
def test_weights_that_do_not_fit_their_config_are_named(tmp_path, tokenizer_path, tokenizer, field, value, expected):
    hf_dir = make_hf_dir(tmp_path / "hf", hf_model(tokenizer.vocab_size), tokenizer_path)
    config_path = hf_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    with pytest.raises(ValueError, match=re.escape(f"{hf_dir} does not fit: ") + ".*" + re.escape(expected)):
        convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad_name", ["../outside.safetensors", "OUTSIDE", "sub/../../outside.safetensors",
                                      "..\\outside.safetensors", "..", "", 7],
                         ids=["parent", "absolute", "through-subfolder", "backslash", "dot-dot", "empty", "number"])
def test_index_shard_names_stay_in_the_model_folder(tmp_path, tokenizer_path, tokenizer, bad_name):
    """Shard names come from a downloaded index file: a name that leads out of the folder is refused, not opened."""
    hf_dir = make_hf_dir(tmp_path / "hf", hf_model(tokenizer.vocab_size), tokenizer_path, sharded=True)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"  # a real file there: only the check keeps the conversion from it
    outside.write_bytes(shard.read_bytes())
    bad_name = str(outside) if bad_name == "OUTSIDE" else bad_name
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {tensor: bad_name if file == shard.name else file
                           for tensor, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    tensor = next(tensor for tensor, file in index["weight_map"].items() if file == bad_name)

    expected = (f"{index_path}: the entry {json.dumps(tensor)}: {json.dumps(bad_name)} is not the name of a file "
                f"in {hf_dir}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


def test_damaged_index_is_named(tmp_path, tokenizer_path, tokenizer):
    hf_dir = make_hf_dir(tmp_path / "hf", hf_model(tokenizer.vocab_size), tokenizer_path, sharded=True)
    index_path = hf_dir / "model.safetensors.index.json"
    index_path.write_text('{"weight_map": {"lm_head.weight": "model-00001-of-')  # cut short, as by a failed download
    with pytest.raises(ValueError, match=re.escape(f"{index_path} is not valid JSON")):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    index_path.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ValueError, match=re.escape(f"{index_path} has no weight_map")):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


# ----------------------------------------------------------------------------------------------------------------
# Downloading (no network: huggingface_hub's functions are replaced by stand-ins that record what the script asks)
# ----------------------------------------------------------------------------------------------------------------

def run_command_line(name: str, *args: str) -> tuple[int, str, str]:
    """checkpoints/<name>.py's command line, run in this process (conftest.run_command)."""
    return run_command(f"checkpoints/{name}.py", *args)


REPO_FILES = ["README.md", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
              "original/consolidated.00.pth"]


def test_download_fetches_only_what_convert_needs_at_the_revision(tmp_path, monkeypatch, capsys):
    calls = {}

    def list_repo_files(repo_id, revision=None, token=None):
        calls["list_repo_files"] = dict(repo_id=repo_id, revision=revision, token=token)
        return REPO_FILES

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: calls.update(snapshot_download=dict(repo_id=repo_id, **kwargs)))

    repo_id, local_dir = "meta-llama/Llama-2-7b-hf", tmp_path / "meta-llama" / "Llama-2-7b-hf"
    commit = "01c7f73d771dfac7d292323805ebc428287df4f9"
    run_script("download", "--repo_id", repo_id, "--revision", commit, "--access_token", "hf_x",
               "--checkpoint_dir", tmp_path)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert calls == {
        "list_repo_files": {"repo_id": repo_id, "revision": commit, "token": "hf_x"},
        "snapshot_download": {"repo_id": repo_id, "revision": commit, "local_dir": local_dir, "token": "hf_x",
                              "allow_patterns": ["config.json", "tokenizer.model", *shards]}}
    out = capsys.readouterr().out
    assert f"from {repo_id} (revision {commit}) to {local_dir}" in out
    assert f"python checkpoints/convert_hf.py --hf_dir {local_dir}" in out

    run_script("download", "--repo_id", repo_id, "--checkpoint_dir", tmp_path)  # by default the main branch
    assert calls["list_repo_files"]["revision"] == calls["snapshot_download"]["revision"] == "main"

    # .bin only where there are no safetensors; tokenizer.json and its companions where there is no tokenizer.model
    # (Llama 3: its original/tokenizer.model is tiktoken's, not SentencePiece's); no tokenizer: refused before download
    assert hf_files_to_download(["config.json", "tokenizer.model", "pytorch_model.bin", "training_args.bin"]) == [
        "config.json", "tokenizer.model", "pytorch_model.bin"]
    llama_3_2_1b = ["config.json", "generation_config.json", "model.safetensors", "original/tokenizer.model",
                    "original/consolidated.00.pth", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert hf_files_to_download(llama_3_2_1b) == ["config.json", "tokenizer.json", "tokenizer_config.json",
                                                  "generation_config.json", "special_tokens_map.json", "model.safetensors"]
    with pytest.raises(ValueError, match="neither tokenizer.model nor tokenizer.json"):
        hf_files_to_download(["config.json", "model.safetensors"])

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        run_script("download", "--repo_id", "a/b")


def hub_http_library():
    """The HTTP library huggingface_hub is built on (httpx or httpx2; requests before huggingface_hub 1.0): its own
    HfHubHTTPError derives from that library's HTTPError."""
    return importlib.import_module(HfHubHTTPError.__mro__[1].__module__.partition(".")[0])


def hub_connection_error() -> Exception:
    """What huggingface_hub raises when the Hub cannot be reached, after its retries: its HTTP library's
    ConnectError (requests' ConnectionError)."""
    library = hub_http_library()
    error_type = getattr(library, "ConnectError", None) or library.ConnectionError
    return error_type("[Errno -2] Name or service not known")


@pytest.mark.parametrize("failing", ["list_repo_files", "snapshot_download", "offline mode"])
def test_download_offline_is_one_clear_line(tmp_path, monkeypatch, failing):
    def fail(*args, **kwargs):
        if failing == "offline mode":  # HF_HUB_OFFLINE=1
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
        raise hub_connection_error()

    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        fail if failing != "snapshot_download" else lambda *args, **kwargs: REPO_FILES)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    code, out, err = run_command_line("download", "--repo_id", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                                      "--revision", "v1.0", "--checkpoint_dir", tmp_path)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err  # no traceback
    assert err.startswith("error: Could not download TinyLlama/TinyLlama-1.1B-Chat-v1.0 (revision v1.0) from "
                          "the Hugging Face Hub (")
    assert ("offline mode is enabled" if failing == "offline mode" else "Name or service not known") in err
    assert "this machine may be offline" in err and "run the same command again" in err
    assert not (tmp_path / "TinyLlama").exists()


def test_download_names_a_missing_revision(tmp_path, monkeypatch):
    def list_repo_files(repo_id, revision=None, token=None):
        message = f"404 Client Error. Revision Not Found for url: .../{revision}.\nRequest id: x"
        try:
            raise RevisionNotFoundError(message)  # huggingface_hub before 1.0
        except TypeError:  # later versions want the response too
            library = hub_http_library()
            request = library.Request("GET", f"https://huggingface.co/api/models/{repo_id}/tree/{revision}")
            raise RevisionNotFoundError(message, response=library.Response(404, request=request)) from None

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    code, out, err = run_command_line("download", "--repo_id", "org/name", "--revision", "v9")
    assert code == 1
    assert err == ("error: org/name has no revision 'v9': give a branch, tag or commit hash from "
                   "https://huggingface.co/org/name/commits/main\n")


# ----------------------------------------------------------------------------------------------------------------
# The command lines
# ----------------------------------------------------------------------------------------------------------------

SCRIPTS = sorted(path.stem for path in (ROOT / "checkpoints").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_through_cli(name, monkeypatch):
    """Each checkpoints/*.py runs `cli(main)` (one-line errors, exit codes) and --help lists every flag of main."""
    import lit_lora.cli

    real_cli, entry_points = lit_lora.cli.cli, []

    def recording_cli(main, flags=None):
        entry_points.append((main, flags))
        return real_cli(main, flags)

    monkeypatch.setattr(lit_lora.cli, "cli", recording_cli)
    code, out, err = run_command_line(name, "--help")
    assert (code, err) == (0, "")
    [(main, flags)] = entry_points
    assert (main.__name__, main.__module__, flags) == ("main", "__main__", None)
    for parameter in inspect.signature(main).parameters:
        assert f"--{parameter} " in out, parameter
    assert main.__doc__.splitlines()[0] in out


@pytest.mark.parametrize("name, flags", [
    ("convert_hf", "--hf_dir {tmp}/hf"),
    ("convert_meta", "--meta_dir {tmp}/llama/7B --model_size 7B --output_dir {tmp}/lit"),
    ("export_hf", "--checkpoint_dir {tmp}/lit --output_dir {tmp}/hf"),
])
def test_dtype_flag_refuses_other_names_while_parsing(tmp_path, name, flags):
    """--dtype is one of three names: the parser refuses others (exit code 2), naming them, before anything runs."""
    assert set(get_args(DtypeName)) == set(DTYPES)
    code, out, err = run_command_line(name, *flags.format(tmp=tmp_path).split(), "--dtype", "int8")
    assert code == 2
    assert err == "error: --dtype int8: expected one of float32, float16, bfloat16 or null (--help lists every flag)\n"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# The LLaMA family of today: each family's shape, scaled down in depth and width, against transformers
# ----------------------------------------------------------------------------------------------------------------

LLAMA_3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# With head size 16 and rope_theta 500000 the wavelengths run from 6 to 6e5 positions: some frequencies are kept,
# one is blended and the rest are slowed down by the factor, so every branch of Llama 3's scaling is exercised.
FAMILIES = {
    "llama-3.1": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA_3_ROPE, tie_word_embeddings=False),
    "llama-3.2": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={**LLAMA_3_ROPE, "factor": 32.0},
                      tie_word_embeddings=True),
    "smollm2": dict(num_key_value_heads=1, rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True),
}


def family_model(vocab_size: int, family: str) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5, **FAMILIES[family])
    torch.manual_seed(0)
    return randomize(LlamaForCausalLM(config))


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_theta + rope_scaling"])
@pytest.mark.parametrize("family", FAMILIES)
def test_todays_families_convert_to_the_same_logits_and_greedy_tokens(tmp_path, tokenizer_path, tokenizer, family,
                                                                      layout):
    hf = family_model(tokenizer.vocab_size, family)
    hf_dir = make_hf_dir(tmp_path / "hf", hf, tokenizer_path)
    saved = json.loads((hf_dir / "config.json").read_text())
    assert "rope_parameters" in saved  # how transformers 5 saves it
    if layout == "rope_theta + rope_scaling":  # how most checkpoints on the Hub carry it
        rope = saved.pop("rope_parameters")
        saved["rope_theta"] = rope.pop("rope_theta")
        saved["rope_scaling"] = rope if rope.get("rope_type") == "llama3" else None
        (hf_dir / "config.json").write_text(json.dumps(saved))
    if FAMILIES[family]["tie_word_embeddings"]:  # saved once, as the embedding
        with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()

    convert_hf_checkpoint(hf_dir)
    lit = load_model(hf_dir)
    expected = FAMILIES[family]
    assert lit.config.tie_embeddings == expected["tie_word_embeddings"]
    assert lit.config.rope_base == int(expected["rope_theta"])
    assert (lit.config.rope_scaling is not None) == (expected["rope_scaling"] is not None)
    if lit.config.tie_embeddings:
        assert lit.lm_head.weight is lit.embed.weight
    assert same_logits(hf, lit, tokenizer.vocab_size) < 1e-4

    prompt = torch.tensor([1, 17, 42, 99, 7])
    with torch.no_grad():
        hf_tokens = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):]
    (lit_tokens,) = generate(lit, [prompt], max_new_tokens=20, temperature=0.0)
    assert lit_tokens.tolist() == hf_tokens.tolist()


@pytest.mark.parametrize("family", ["llama-3.2", "smollm2"])
def test_tied_models_export_to_transformers_and_peft_and_back(tmp_path, tokenizer_path, tokenizer, family):
    hf = family_model(tokenizer.vocab_size, family)
    convert_hf_checkpoint(make_hf_dir(tmp_path / "hf", hf, tokenizer_path), tmp_path / "lit")
    export_hf_checkpoint(tmp_path / "lit", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert (config["rope_scaling"] is None) == (FAMILIES[family]["rope_scaling"] is None)
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers ties it to the embedding when it loads
    again = LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert same_logits(again, load_model(tmp_path / "lit"), tokenizer.vocab_size) < 1e-4

    # LoRA on q and v of a tied model, through PEFT and back; the head is refused (it is the embedding)
    with pytest.raises(ValueError, match="lm_head is its embedding matrix"):
        apply_lora(load_model(tmp_path / "lit"), targets=("q", "head"))
    lora = apply_lora(load_model(tmp_path / "lit"), r=4, alpha=8, targets=("q", "v")).eval()
    with torch.no_grad():  # B away from zero, so the update shows in the logits
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    save_lora(lora, tmp_path / "lora.pth")
    export_peft_adapter(tmp_path / "lora.pth", tmp_path / "peft", tmp_path / "lit")
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "exported"), tmp_path / "peft")
    assert same_logits(peft_model.eval(), lora, tokenizer.vocab_size) < 1e-4
    import_peft_adapter(tmp_path / "peft", tmp_path / "lit", tmp_path / "back.pth")
    back = read_lora_file(tmp_path / "back.pth")["lora"]
    assert all(torch.equal(back[name], tensor) for name, tensor in read_lora_file(tmp_path / "lora.pth")["lora"].items())


@pytest.mark.parametrize("family, tokenizer_fixture", [("llama-3.2", "llama3_tokenizer_dir"),
                                                       ("smollm2", "smollm2_tokenizer_dir")])
def test_a_tokenizer_json_model_converts_trains_and_exports(tmp_path, family, tokenizer_fixture, request):
    """A Hugging Face folder with tokenizer.json (no tokenizer.model) converts; the checkpoint folder carries the
    tokenizer's files, its stop ids come from generation_config.json, and the export gives them back to transformers."""
    tokenizer_dir = request.getfixturevalue(tokenizer_fixture)
    tokenizer = Tokenizer(tokenizer_dir)
    hf = family_model(tokenizer.vocab_size, family)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    for path in tokenizer.files:
        (hf_dir / path.name).write_bytes(path.read_bytes())
    convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert sorted(p.name for p in (tmp_path / "lit").iterdir()) == sorted(
        ["checksums.json", "lit_model.pth", "model_config.json", *(path.name for path in tokenizer.files)])
    lit = load_model(tmp_path / "lit")
    assert Tokenizer(tmp_path / "lit").stop_ids == tokenizer.stop_ids
    assert len(tokenizer.stop_ids) == (2 if family == "llama-3.2" else 1)  # the fixture's Llama 3: two end tokens
    assert same_logits(hf, lit, tokenizer.vocab_size) < 1e-4

    export_hf_checkpoint(tmp_path / "lit", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    stop_ids = list(tokenizer.stop_ids)
    assert config["eos_token_id"] == (stop_ids if len(stop_ids) > 1 else stop_ids[0])
    text = "Hello world!\n  Two  spaces, digits 12345 and <|eot_id|>."
    assert AutoTokenizer.from_pretrained(tmp_path / "exported")(text)["input_ids"] == tokenizer.encode(text).tolist()


def test_meta_llama3_download_is_refused_clearly(tmp_path, tokenizer_path, tokenizer):
    """Meta's own Llama 3 download ships tiktoken's BPE ranks as tokenizer.model: not SentencePiece."""
    meta_dir = make_meta_dir(tmp_path / "llama3", randomize(LLaMA(Config.from_name("micro", vocab_size=tokenizer.vocab_size))),
                             tokenizer_path, n_shards=1)
    (meta_dir / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's format: base64 token, rank
    with pytest.raises(ValueError, match="is not a SentencePiece model: Meta's Llama 3 downloads ship tiktoken's"):
        convert_meta_checkpoint(meta_dir, tmp_path / "out", model_size="micro")
