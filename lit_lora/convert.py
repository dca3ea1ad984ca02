"""Weights in and out: Meta and Hugging Face checkpoints -> lit-lora, and lit-lora -> Hugging Face and PEFT.

LLaMA is published in two formats, and both hold the same matrices as `lit_lora/model.py` under other names:

- Meta's original release (LLaMA, Llama 2): `consolidated.00.pth`, `consolidated.01.pth`, ... and `params.json`.
  Models of 13B and up are split into model-parallel shards: every shard holds a slice of every matrix.
- Hugging Face's `LlamaForCausalLM` (Llama 2 `-hf` repos, TinyLlama, OpenLLaMA): `config.json` and
  `model.safetensors` or `pytorch_model.bin`, possibly split into shards by tensor, listed in an index file.

The only change beyond renaming: rotary embeddings rotate pairs of coordinates of each query/key head. Meta
pairs neighbours (x0, x1), (x2, x3), ...; Hugging Face and `apply_rope` pair the two halves (x_i, x_{i+hs/2}).
Reordering the rows of the query and key weights (`permute_meta_qk`) turns one layout into the other, so
Meta -> lit needs it and Hugging Face -> lit does not.

Memory. Converting holds one copy of the weights, never two: safetensors files are read one tensor at a time,
`.bin` and Meta files are memory-mapped (read from disk as needed, not copied into RAM), and the converted
tensors are collected into one state dict that is saved once. For 7B in bfloat16 that is about 13.5 GB.
Every folder is written into a temporary folder first and moved into place at the end.
"""

import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lit_lora.lora import (LORA_TARGETS, apply_lora, load_lora, lora_state_dict, merge_lora,
                           read_lora_file, save_lora)
from lit_lora.model import LLaMA, Config
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import SHAPE_FIELDS, atomic_folder, current_umask, format_bytes, load_model, peak_memory_bytes

# ---------------------------------------------------------------------------------------------------------------
# Names. Each table maps the names of one format to ours; the inverse direction is the same table read backwards.
# ---------------------------------------------------------------------------------------------------------------

HF_TO_LIT = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_LAYER_TO_LIT = {  # inside model.layers.{i} <-> blocks.{i}
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
HF_IGNORED = ("self_attn.rotary_emb.inv_freq",)  # a buffer some old checkpoints saved; we compute it (build_rope_cache)

META_TO_LIT = {
    "tok_embeddings.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
META_LAYER_TO_LIT = {  # inside layers.{i} <-> blocks.{i}
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn.q_proj.weight",
    "attention.wk.weight": "attn.k_proj.weight",
    "attention.wv.weight": "attn.v_proj.weight",
    "attention.wo.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
META_IGNORED = ("rope.freqs",)  # the original LLaMA saved its RoPE frequencies; we compute them

# How Meta's model-parallel shards split each matrix (fairscale layers): a column-parallel layer splits its
# outputs (rows, dim 0), a row-parallel one its inputs (columns, dim 1), the embedding its n_embd columns.
# The norms are not listed: every shard holds the whole vector.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _rename(name: str, top: dict, layer: dict, layer_prefix: str, new_layer_prefix: str) -> str:
    if name in top:
        return top[name]
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", name)
    if match and match.group(2) in layer:
        return f"{new_layer_prefix}{match.group(1)}.{layer[match.group(2)]}"
    raise KeyError(name)


def hf_to_lit_name(name: str) -> Optional[str]:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blocks.3.attn.q_proj.weight'; None for a buffer to skip."""
    if name.endswith(HF_IGNORED):
        return None
    try:
        return _rename(name, HF_TO_LIT, HF_LAYER_TO_LIT, "model.layers.", "blocks.")
    except KeyError:
        raise ValueError(f"Unknown Hugging Face tensor {name!r}: a LLaMA checkpoint has only "
                         f"{', '.join(HF_TO_LIT)} and model.layers.N.{{{', '.join(HF_LAYER_TO_LIT)}}}") from None


def lit_to_hf_name(name: str) -> str:
    """'blocks.3.attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    top = {lit: hf for hf, lit in HF_TO_LIT.items()}
    layer = {lit: hf for hf, lit in HF_LAYER_TO_LIT.items()}
    try:
        return _rename(name, top, layer, "blocks.", "model.layers.")
    except KeyError:
        raise ValueError(f"No Hugging Face name for lit-lora tensor {name!r}") from None


def meta_to_lit_name(name: str) -> Optional[str]:
    """'layers.3.attention.wq.weight' -> 'blocks.3.attn.q_proj.weight'; None for a buffer to skip."""
    if name in META_IGNORED:
        return None
    try:
        return _rename(name, META_TO_LIT, META_LAYER_TO_LIT, "layers.", "blocks.")
    except KeyError:
        raise ValueError(f"Unknown Meta tensor {name!r}: a LLaMA checkpoint has only "
                         f"{', '.join(META_TO_LIT)} and layers.N.{{{', '.join(META_LAYER_TO_LIT)}}}") from None


def permute_meta_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of Meta's query or key weight (n_heads * hs, n_embd) from interleaved RoPE pairs to
    rotate-half pairs (see the module docstring). `n_heads` is n_head for wq and n_query_groups for wk.

    Within a head, Meta's row 2j + c (pair j, coordinate c of the pair) becomes our row c * hs/2 + j.
    """
    rows, cols = weight.shape
    head_size = rows // n_heads
    return weight.view(n_heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

# The config fields that decide what the model computes: a preset given by name must agree with the checkpoint.
CHECKED_FIELDS = ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "norm_eps", "rope_base")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The scripts' --dtype flag: its parser refuses any other value, listing these.
DtypeName = Literal["float32", "float16", "bfloat16"]


def dtype_from_name(name: Optional[str]) -> Optional[torch.dtype]:
    """'bfloat16' -> torch.bfloat16; None keeps the checkpoint's own dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"Cannot store weights as dtype {name!r}: choose one of {', '.join(DTYPES)} "
                         "(or leave --dtype out to keep the checkpoint's dtype)")
    return DTYPES[name]


def _whole_number(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else x


def apply_preset(inferred: Config, preset: str, source: str) -> Config:
    """The preset `preset` (its name and context length), checked against the config read from `source`."""
    config = Config.from_name(preset, vocab_size=inferred.vocab_size, padded_vocab_size=inferred.padded_vocab_size)
    for field in CHECKED_FIELDS:
        if getattr(config, field) != getattr(inferred, field):
            raise ValueError(f"Preset {preset!r} does not match {source}: its {field} is {getattr(config, field)}, "
                             f"{source} says {getattr(inferred, field)}")
    return config


def config_from_hf(config_json: dict, model_name: Optional[str] = None) -> Config:
    """Our Config from a Hugging Face `config.json`; `model_name` (a preset) names it and is checked against it.

    The embedding is not padded (padded_vocab_size = vocab_size) so every tensor keeps its shape.
    A config this model cannot reproduce is an error naming the field.
    """
    hf = config_json

    def unsupported(field, why):
        raise ValueError(f"config.json: {field} = {json.dumps(hf.get(field))} is not supported: {why}")

    if hf.get("model_type") != "llama":
        unsupported("model_type", "lit-lora converts LLaMA-architecture models only (model_type \"llama\")")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "LLaMA's SwiGLU uses silu")
    if hf.get("tie_word_embeddings", False):
        unsupported("tie_word_embeddings", "lm_head and embed are separate matrices here")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            unsupported(field, "the linear layers have no bias")
    if hf.get("rope_scaling") is not None:
        unsupported("rope_scaling", "only plain RoPE is implemented (no scaled or extended context)")
    rope = hf.get("rope_parameters") or {}  # newer transformers put rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_parameters.rope_type = {json.dumps(rope['rope_type'])} is not supported: "
                         "only plain RoPE (\"default\") is implemented")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               if f not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: is this a Hugging Face LlamaForCausalLM config?")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") is not None and hf["head_dim"] * n_head != n_embd:
        unsupported("head_dim", f"heads must split hidden_size evenly (hidden_size / num_attention_heads = "
                                f"{n_embd / n_head:g})")
    config = Config(
        block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=_whole_number(rope.get("rope_theta", hf.get("rope_theta", 10000))),
    )
    return apply_preset(config, model_name, "config.json") if model_name else config


def config_to_hf(config: Config) -> dict:
    """A Hugging Face `config.json` for our Config, in the long-standing format every transformers version reads.

    The vocabulary is the embedding's padded size: the padding rows are never produced by the tokenizer.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def config_from_meta(params: dict, vocab_size: int, model_size: str) -> Config:
    """Our Config from Meta's `params.json`, checked against the preset `model_size` (which gives the context
    length, absent from params.json). `vocab_size` is params.json's, or the tokenizer's where that says -1."""
    n_embd = params["dim"]
    # The SwiGLU hidden size, as Meta's model.py computes it: 2/3 of 4 * dim, times ffn_dim_multiplier
    # (Llama 2 70B: 1.3), rounded up to a multiple of multiple_of. 7B: 11008; 70B: 28672.
    hidden = int(2 * 4 * n_embd / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    intermediate_size = (hidden + multiple_of - 1) // multiple_of * multiple_of
    config = Config(
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        n_layer=params["n_layers"],
        n_head=params["n_heads"],
        n_query_groups=params.get("n_kv_heads") or params["n_heads"],
        n_embd=n_embd,
        intermediate_size=intermediate_size,
        norm_eps=params.get("norm_eps", 1e-6),
        rope_base=_whole_number(params.get("rope_theta", 10000)),
    )
    return apply_preset(config, model_size, "params.json")


# ---------------------------------------------------------------------------------------------------------------
# Writing folders
# ---------------------------------------------------------------------------------------------------------------

def check_state_dict(state_dict: dict, config: Config, source: str) -> None:
    """Every tensor the model needs, with the shape it needs (checked against a model on the meta device)."""
    with torch.device("meta"):
        expected = LLaMA(config).state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match its config ({config.n_layer} layers): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, but its config gives "
                             f"{tuple(expected[name].shape)}")


def check_tokenizer(tokenizer_path: Path, config: Config) -> None:
    vocab = Tokenizer(tokenizer_path).vocab_size
    if vocab > config.padded_vocab_size:
        raise ValueError(f"{tokenizer_path} has {vocab} tokens, but the model embeds only {config.padded_vocab_size}: "
                         "the tokenizer belongs to another model")


def write_checkpoint(output_dir: Path, state_dict: dict, config: Config, tokenizer_path: Path) -> Path:
    """The folder that `lit_lora.utils.load_model` reads: lit_model.pth, model_config.json, tokenizer.model."""
    with atomic_folder(output_dir) as tmp:
        torch.save(state_dict, tmp / "lit_model.pth")
        config.to_file(tmp / "model_config.json")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    size = (output_dir / "lit_model.pth").stat().st_size
    print(f"Wrote {output_dir} (lit_model.pth {format_bytes(size)}); peak memory {format_bytes(peak_memory_bytes())}")
    return output_dir


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, giving the file the usual permissions (-rw-r--r-- under umask 022): save_file
    creates it readable by its owner only."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> lit
# ---------------------------------------------------------------------------------------------------------------

HF_WEIGHTS = (  # (single file, index of shards), safetensors first
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def hf_files_to_download(repo_files: list[str]) -> list[str]:
    """The files of a Hugging Face repo that convert_hf_checkpoint reads: config.json, tokenizer.model and the
    weights in one format (safetensors where the repo has them, else .bin), as one file or shards with their index."""
    for single, index in HF_WEIGHTS:
        stem, ext = single.split(".")  # "model", "safetensors"
        weights = [f for f in repo_files if f in (single, index) or re.fullmatch(rf"{stem}-\d+-of-\d+\.{ext}", f)]
        if weights:
            break
    else:
        readable = ", ".join(single for single, _ in HF_WEIGHTS)
        raise ValueError(f"The repo has no weights convert_hf.py can read ({readable}, or their shards); "
                         f"it holds {sorted(repo_files)[:20]}")
    for needed in ("config.json", "tokenizer.model"):
        if needed not in repo_files:
            raise ValueError(f"The repo has no {needed}, which convert_hf.py needs"
                             + (" (lit-lora reads SentencePiece tokenizers only; Llama 3's tiktoken is not supported)"
                                if needed == "tokenizer.model" else ""))
    return ["config.json", "tokenizer.model", *sorted(weights)]


def shard_paths(index_path: Path) -> list[Path]:
    """The shard files an index lists in its weight_map (tensor name -> file), each one there.

    The names come from a downloaded file, so each must be a plain file name in the index's own folder, as
    transformers writes them (model-00001-of-00002.safetensors): a name such as ../../etc/passwd or /etc/passwd
    is refused, not opened."""
    folder = index_path.parent
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON ({error}): download it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map (tensor name -> shard file): download it again")
    for tensor_name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise ValueError(f"{index_path}: the entry {json.dumps(tensor_name)}: {json.dumps(shard)} is not the "
                             f"name of a file in {folder} (an index names the shards beside it, such as "
                             "model-00001-of-00002.safetensors). The index is damaged or not from transformers: "
                             "download the model again.")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{index_path} lists the shard {shard}, which is not in {folder}: "
                                    "download it again (checkpoints/download.py resumes)")
    return [folder / shard for shard in shards]


def find_hf_weight_files(hf_dir: Path) -> list[Path]:
    """The files that hold the weights: one file, or every shard the index lists (each must be there)."""
    for single, index in HF_WEIGHTS:
        if (hf_dir / index).is_file():
            return shard_paths(hf_dir / index)
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    expected = ", ".join(name for pair in HF_WEIGHTS for name in pair)
    raise FileNotFoundError(f"No weights in {hf_dir}: expected one of {expected}. "
                            "Download them with `python checkpoints/download.py --repo_id ORG/NAME`.")


def read_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, one at a time: safetensors reads each tensor when asked, .bin is mmapped."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from torch.load(path, mmap=True, weights_only=True, map_location="cpu").items()


def convert_hf_checkpoint(hf_dir: Union[str, Path], output_dir: Union[str, Path, None] = None,
                          model_name: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """A Hugging Face LlamaForCausalLM folder -> a lit-lora checkpoint folder (by default the same folder)."""
    hf_dir = Path(hf_dir)
    output_dir = Path(output_dir) if output_dir is not None else hf_dir
    torch_dtype = dtype_from_name(dtype)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {hf_dir}: is it a Hugging Face model folder? "
                                "Download one with `python checkpoints/download.py --repo_id ORG/NAME`.")
    files = find_hf_weight_files(hf_dir)
    tokenizer_path = hf_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"No tokenizer.model in {hf_dir}: lit-lora needs the SentencePiece tokenizer "
                                "(models that ship only tokenizer.json, such as Llama 3, are not supported)")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    config = config_from_hf(hf_config, model_name)
    config.name = config.name or hf_dir.name
    # Where the weights came from, for the record: export_peft.py writes it as base_model_name_or_path, so the
    # whole path of the folder on this machine (config.json's _name_or_path may be one on the uploader's).
    config.extra["hf_model"] = str(hf_dir.resolve())
    check_tokenizer(tokenizer_path, config)

    state_dict = {}
    for i, path in enumerate(files, 1):
        count = 0
        for hf_name, tensor in read_hf_tensors(path):
            lit_name = hf_to_lit_name(hf_name)
            if lit_name is not None:
                state_dict[lit_name] = tensor.to(torch_dtype) if torch_dtype else tensor
                count += 1
        print(f"[{i}/{len(files)}] {path.name}: {count} tensors")
    check_state_dict(state_dict, config, str(hf_dir))
    return write_checkpoint(output_dir, state_dict, config, tokenizer_path)


# ---------------------------------------------------------------------------------------------------------------
# Meta -> lit
# ---------------------------------------------------------------------------------------------------------------

def merge_meta_shards(shards: list[dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors from model-parallel shards: the slices concatenated along the dimension they were split on."""
    for name in shards[0]:
        dim = META_SHARD_DIM.get(name.split(".")[-2])  # 'layers.0.attention.wq.weight' -> 'wq'
        if len(shards) == 1 or dim is None:  # a single shard, or a norm that every shard holds whole
            yield name, shards[0][name]
        else:
            yield name, torch.cat([shard[name] for shard in shards], dim=dim)


def convert_meta_checkpoint(meta_dir: Union[str, Path], output_dir: Union[str, Path], model_size: str,
                            dtype: Optional[str] = None) -> Path:
    """Meta's consolidated.NN.pth shards + params.json (+ tokenizer.model here or in the parent folder)
    -> a lit-lora checkpoint folder."""
    meta_dir, output_dir = Path(meta_dir), Path(output_dir)
    torch_dtype = dtype_from_name(dtype)
    shard_paths = sorted(meta_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FileNotFoundError(f"No consolidated.*.pth in {meta_dir}: point --meta_dir at the folder of one model "
                                "(e.g. llama/7B or llama-2-7b) from Meta's download")
    if not (meta_dir / "params.json").is_file():
        raise FileNotFoundError(f"No params.json in {meta_dir}: it comes with the consolidated.*.pth files")
    candidates = (meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model")  # llama-2-7b/ or llama/7B/
    tokenizer_path = next((path for path in candidates if path.is_file()), None)
    if tokenizer_path is None:
        raise FileNotFoundError(f"No tokenizer.model in {meta_dir} or {meta_dir.parent}: it comes with Meta's download")
    params = json.loads((meta_dir / "params.json").read_text())
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:  # the original LLaMA's params.json says -1: the tokenizer decides
        vocab_size = Tokenizer(tokenizer_path).vocab_size
    config = config_from_meta(params, vocab_size, model_size)
    check_tokenizer(tokenizer_path, config)

    print(f"Reading {len(shard_paths)} shard(s) from {meta_dir} (memory-mapped)")
    shards = [torch.load(p, mmap=True, weights_only=True, map_location="cpu") for p in shard_paths]
    state_dict = {}
    for meta_name, tensor in merge_meta_shards(shards):
        lit_name = meta_to_lit_name(meta_name)
        if lit_name is None:
            continue
        if lit_name.endswith("attn.q_proj.weight"):
            tensor = permute_meta_qk(tensor, config.n_head)
        elif lit_name.endswith("attn.k_proj.weight"):
            tensor = permute_meta_qk(tensor, config.n_query_groups)
        state_dict[lit_name] = tensor.to(torch_dtype) if torch_dtype else tensor
    check_state_dict(state_dict, config, str(meta_dir))
    return write_checkpoint(output_dir, state_dict, config, tokenizer_path)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer -> Hugging Face tokenizer files
# transformers builds a tokenizer from tokenizer.json (the `tokenizers` library's format) and tokenizer_config.json.
# Given only tokenizer.model it needs protobuf to convert it, and without tokenizer_config.json it does not know that
# LLaMA starts every text with BOS. So the export writes both, built here as plain JSON from the SentencePiece model.
# ---------------------------------------------------------------------------------------------------------------

SPACE = "▁"  # U+2581: SentencePiece writes each space as this character, and puts one before the text

# What SentencePiece's normalizer may change: spaces at both ends and doubled, a tab, a newline, and characters that
# Unicode NFKC normalization rewrites (the ligature "ﬁ", the full-width "Ａ"). LLaMA's tokenizer keeps them all.
NORMALIZATION_PROBE = "  two  spaces,\ta tab,\na newline, \ufb01 \uff21 "


def sentencepiece_merges(tokenizer: Tokenizer) -> list[list[str]]:
    """The merge rules of a Hugging Face BPE model that splits text as this SentencePiece BPE model does.

    SentencePiece starts from single characters and repeatedly joins the adjacent pair that makes the piece with
    the highest score. Hugging Face's BPE starts the same way and repeatedly applies, among the adjacent pairs, the
    merge rule (left, right) that comes first in its list. So: one rule for every way of cutting a piece into two
    pieces, listed in the order of the score of the piece they make, best first (as transformers' converter does).
    Only ordinary pieces take part: control (<s>), unknown and byte (<0x0A>) pieces are never made by a merge.
    (A tokenizer with user-defined pieces, which SentencePiece matches whole before merging, is not reproduced;
    LLaMA's has none.)
    """
    processor = tokenizer.processor
    ordinary = {}  # piece -> id
    for i in range(processor.get_piece_size()):
        if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i) or processor.is_unused(i)):
            ordinary[processor.id_to_piece(i)] = i
    rules = []  # (sort key, [left, right])
    for piece, piece_id in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                key = (-processor.get_score(piece_id), piece_id, ordinary[left], ordinary[right])  # ties: by id
                rules.append((key, [left, right]))
    rules.sort(key=lambda rule: rule[0])
    return [pair for _, pair in rules]


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (file name -> content) for a LLaMA-style
    SentencePiece BPE tokenizer, so that `AutoTokenizer.from_pretrained` gives the ids `tokenizer.encode` gives.

    The pipeline of tokenizer.json, in the order it runs:
      normalizer      one "▁" before the text (SentencePiece's dummy prefix), then each space -> "▁"
      pre_tokenizer   none: the text stays one piece, as SentencePiece merges across spaces too
      model           BPE over SentencePiece's pieces (same ids) with the merges above; byte_fallback writes a
                      character outside the vocabulary as its UTF-8 bytes (<0xE2><0x82><0xAC>), as SentencePiece does
      post_processor  BOS before the text
      decoder         "▁" -> space, byte tokens -> characters, then drop the space of the dummy prefix

    Why a normalizer and not the Metaspace pre-tokenizer of newer Llama files: Metaspace adds no "▁" before a text
    that starts with a space, so " Hello" would lose a space that SentencePiece keeps. For the same reason
    tokenizer_config.json names the generic PreTrainedTokenizerFast, which runs tokenizer.json as it is: transformers'
    LlamaTokenizer class replaces the pipeline with its own Metaspace one.
    """
    processor = tokenizer.processor
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    special_ids = [i for i in range(len(pieces)) if processor.is_control(i) or processor.is_unknown(i)]
    if tokenizer.bos_id < 0:
        raise ValueError(f"{tokenizer.model_path} has no BOS token, which lit-lora puts before every text: "
                         "it is not the tokenizer of a lit-lora model")
    bos, unk = pieces[tokenizer.bos_id], pieces[processor.unk_id()]
    eos = pieces[tokenizer.eos_id] if tokenizer.eos_id >= 0 else None

    dummy_prefix = processor.normalize("a").startswith(SPACE)
    normalized = processor.normalize(NORMALIZATION_PROBE)
    if normalized != (SPACE if dummy_prefix else "") + NORMALIZATION_PROBE.replace(" ", SPACE):
        print(f"Warning: {tokenizer.model_path} changes text before splitting it ({NORMALIZATION_PROBE!r} becomes "
              f"{normalized!r}); tokenizer.json does not, so transformers will give other ids than lit-lora for "
              "such text (LLaMA's tokenizers and those of Tokenizer.train keep text as it is).", file=sys.stderr)

    def added_token(i: int) -> dict:  # a special token: matched as a whole in the text, never split or normalized
        return {"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    bos_first = {  # "$A" is the text; "pair" is for two texts at once (transformers asks for it)
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
    }
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy_prefix:  # LLaMA's: "Hello" is encoded as "▁Hello", like the "world" of "Hello world"
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(i) for i in special_ids],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": bos_first,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, piece in enumerate(pieces)}, "merges": sentencepiece_merges(tokenizer)},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is (see above)
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "added_tokens_decoder": {str(i): {k: v for k, v in added_token(i).items() if k != "id"} for i in special_ids},
        "clean_up_tokenization_spaces": False,  # else decoding turns "a ." into "a."
        "model_max_length": model_max_length,
    }
    special_tokens_map = {name: {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}
                          for name, piece in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if piece}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_tokens_map}


# ---------------------------------------------------------------------------------------------------------------
# lit -> Hugging Face
# ---------------------------------------------------------------------------------------------------------------

def export_hf_checkpoint(checkpoint_dir: Union[str, Path], output_dir: Union[str, Path],
                         lora_path: Union[str, Path, None] = None, dtype: Optional[str] = None) -> Path:
    """A lit-lora checkpoint folder (with a LoRA merged in, if given) -> a folder that
    `transformers.LlamaForCausalLM.from_pretrained` loads (config.json, model.safetensors) and
    `transformers.AutoTokenizer.from_pretrained` too (tokenizer.json, tokenizer_config.json, special_tokens_map.json;
    tokenizer.model is kept beside them)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    torch_dtype = dtype_from_name(dtype)
    model = load_model(checkpoint_dir)  # memory-mapped: the checkpoint file is never written to
    if lora_path is not None:
        load_lora(model, lora_path)
        merge_lora(model)  # W0 + alpha/r B A: copy-on-write, so only the merged matrices take new memory
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:  # the LoRA factors are merged into the weights
            state_dict[lit_to_hf_name(name)] = (tensor.to(torch_dtype) if torch_dtype else tensor).contiguous()
    hf_config = config_to_hf(model.config)
    tokenizer = Tokenizer(checkpoint_dir / "tokenizer.model")
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     torch_dtype=str(next(iter(state_dict.values())).dtype).removeprefix("torch."))
    tokenizer_files = hf_tokenizer_files(tokenizer, model.config.block_size)
    with atomic_folder(output_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_safetensors(state_dict, tmp / "model.safetensors")
        shutil.copyfile(tokenizer.model_path, tmp / "tokenizer.model")  # for SentencePiece itself (and lit-lora)
        for name, content in tokenizer_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"Wrote {output_dir} (config.json, model.safetensors, tokenizer.model, {', '.join(tokenizer_files)}); "
          f"peak memory {format_bytes(peak_memory_bytes())}")
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# LoRA <-> PEFT
# PEFT stores one (lora_A, lora_B) pair per adapted nn.Linear, under the module's name inside
# PeftModel -> LlamaForCausalLM: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.
# Its lora_A (r, d_in), lora_B (d_out, r) and scaling lora_alpha / r are ours, so the tensors copy as they are.
# ---------------------------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
# adapter_config.json fields whose other values change what the adapter computes, with the value we support.
PEFT_SUPPORTED_VALUES = {"peft_type": "LORA", "bias": "none", "use_dora": False, "use_rslora": False,
                         "fan_in_fan_out": False, "lora_bias": False}
PEFT_UNSUPPORTED_FIELDS = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")


# Our LoRA targets -> PEFT's target_modules: our module names are Hugging Face's ('q' -> 'q_proj', 'head' -> 'lm_head').
PEFT_TARGET_MODULES = {target: path.rsplit(".", 1)[-1] for target, path in LORA_TARGETS.items()}


def lit_to_peft_key(name: str) -> str:
    """'blocks.0.attn.q_proj.lora_A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    module, _, factor = name.rpartition(".")
    return PEFT_PREFIX + lit_to_hf_name(module + ".weight").removesuffix(".weight") + f".{factor}.weight"


def peft_to_lit_key(key: str) -> Optional[str]:
    """The inverse of lit_to_peft_key; None for a copy of a base weight (PEFT saves lm_head's when it adapts it)."""
    match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A|lora_B|base_layer)\.weight", key)
    if match is None:
        raise ValueError(f"Unsupported PEFT tensor {key!r}: only LoRA factors (...lora_A.weight, ...lora_B.weight)")
    module, factor = match.groups()
    if factor == "base_layer":
        return None
    return hf_to_lit_name(module + ".weight").removesuffix(".weight") + f".{factor}"


def peft_base_model(base_config: dict, checkpoint_dir: Optional[Path], given: Optional[str]) -> Optional[str]:
    """What adapter_config.json names as base_model_name_or_path, where `AutoPeftModelForCausalLM` loads the base
    model from: `given` (--base_model_name_or_path), else the Hugging Face folder the base was converted from
    (recorded by convert_hf_checkpoint), else `checkpoint_dir` if transformers can load it (it holds config.json).
    Else None, with a warning: a preset name such as "7B" is no Hugging Face model, and transformers would look for
    it on the Hub."""
    if given:
        return given
    if base_config.get("extra", {}).get("hf_model"):
        return base_config["extra"]["hf_model"]
    if checkpoint_dir is not None and (checkpoint_dir / "config.json").is_file():
        return str(checkpoint_dir.resolve())
    print("Warning: the Hugging Face base model of this LoRA is unknown (its base was not converted by "
          "convert_hf.py" + (f", and {checkpoint_dir} holds no config.json" if checkpoint_dir is not None else "")
          + "), so adapter_config.json says base_model_name_or_path: null. Pass --base_model_name_or_path with a "
          "repo id or the folder export_hf.py wrote for the base, to load the adapter with AutoPeftModelForCausalLM.",
          file=sys.stderr)
    return None


def export_peft_adapter(lora_path: Union[str, Path], output_dir: Union[str, Path],
                        checkpoint_dir: Union[str, Path, None] = None,
                        base_model_name_or_path: Optional[str] = None) -> Path:
    """A lit-lora LoRA file -> a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained` loads onto the base model exported by export_hf_checkpoint."""
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    lora_file = read_lora_file(lora_path)
    base, lora_config = lora_file["base_config"], lora_file["lora_config"]
    if checkpoint_dir is not None:  # the LoRA must fit the base model it will be loaded onto
        config = Config.from_file(checkpoint_dir / "model_config.json")
        for field in SHAPE_FIELDS:
            if base.get(field) != getattr(config, field):
                raise ValueError(f"{lora_path} was trained on another base model: its {field} is {base.get(field)}, "
                                 f"{checkpoint_dir}'s is {getattr(config, field)}")
        base = asdict(config)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft_base_model(base, checkpoint_dir, base_model_name_or_path),
        "r": lora_config["r"],
        "lora_alpha": lora_config["alpha"],
        "lora_dropout": lora_config["dropout"],
        "target_modules": [PEFT_TARGET_MODULES[target] for target in lora_config["targets"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {lit_to_peft_key(name): tensor.contiguous() for name, tensor in lora_file["lora"].items()}
    with atomic_folder(output_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_safetensors(tensors, tmp / "adapter_model.safetensors")
    print(f"Wrote {output_dir} (adapter_config.json, adapter_model.safetensors: {len(tensors)} tensors); "
          f"base model: {adapter_config['base_model_name_or_path']}")
    return output_dir


def read_peft_adapter(peft_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors (adapter_model.safetensors, or .bin from older PEFT)."""
    if not (peft_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No adapter_config.json in {peft_dir}: is it a PEFT adapter folder?")
    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    if (peft_dir / "adapter_model.safetensors").is_file():
        tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    elif (peft_dir / "adapter_model.bin").is_file():
        tensors = torch.load(peft_dir / "adapter_model.bin", weights_only=True, map_location="cpu")
    else:
        raise FileNotFoundError(f"No adapter_model.safetensors or adapter_model.bin in {peft_dir}")
    return adapter_config, tensors


def import_peft_adapter(peft_dir: Union[str, Path], checkpoint_dir: Union[str, Path],
                        output_path: Union[str, Path]) -> Path:
    """A PEFT LoRA adapter for a Llama model -> a lit-lora LoRA file for the base model in `checkpoint_dir`
    (r, alpha, dropout and targets come from adapter_config.json)."""
    peft_dir, checkpoint_dir, output_path = Path(peft_dir), Path(checkpoint_dir), Path(output_path)
    adapter_config, peft_tensors = read_peft_adapter(peft_dir)
    source = peft_dir / "adapter_config.json"
    for field, supported in PEFT_SUPPORTED_VALUES.items():
        if adapter_config.get(field, supported) != supported:
            raise ValueError(f"{source}: {field} = {json.dumps(adapter_config[field])} is not supported "
                             f"(only {json.dumps(supported)})")
    for field in PEFT_UNSUPPORTED_FIELDS:
        if adapter_config.get(field):
            raise ValueError(f"{source}: {field} = {json.dumps(adapter_config[field])} is not supported "
                             "(one rank and alpha for every adapted layer of every block)")
    modules = adapter_config.get("target_modules")
    targets_of = {module: target for target, module in PEFT_TARGET_MODULES.items()}
    if not isinstance(modules, list) or any(m not in targets_of for m in modules):
        raise ValueError(f"{source}: target_modules = {json.dumps(modules)} is not supported: give a list of "
                         f"{', '.join(targets_of)}")

    config = Config.from_file(checkpoint_dir / "model_config.json")
    with torch.device("meta"):  # shapes only: the base weights are not needed
        model = LLaMA(config)
    apply_lora(model, r=adapter_config["r"], alpha=adapter_config["lora_alpha"],
               dropout=adapter_config.get("lora_dropout", 0.0),
               targets=tuple(t for t in LORA_TARGETS if PEFT_TARGET_MODULES[t] in modules))  # in our order
    expected = lora_state_dict(model)
    tensors = {}
    for key, tensor in peft_tensors.items():
        name = peft_to_lit_key(key)
        if name is None:
            continue
        if name not in expected:
            raise ValueError(f"{peft_dir}: tensor {key} does not fit {checkpoint_dir} with target_modules {modules}")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{peft_dir}: tensor {key} has shape {tuple(tensor.shape)}, but the base model in "
                             f"{checkpoint_dir} needs {tuple(expected[name].shape)} (another base model?)")
        tensors[name] = tensor
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{peft_dir} lacks {len(missing)} LoRA tensor(s), e.g. {lit_to_peft_key(missing[0])}")
    model.load_state_dict(tensors, strict=False, assign=True)  # the LoRA factors become real tensors
    save_lora(model, output_path)
    print(f"Wrote {output_path} (r={adapter_config['r']}, alpha={adapter_config['lora_alpha']}, "
          f"targets {model.lora_config.targets})")
    return output_path
