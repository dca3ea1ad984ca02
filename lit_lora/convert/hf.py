"""Hugging Face <-> lit-lora: `LlamaForCausalLM` folders in (convert_hf_checkpoint) and out (export_hf_checkpoint).

A Hugging Face LLaMA folder (Llama 2 `-hf` repos, TinyLlama, OpenLLaMA) holds:
    config.json                 the architecture, with Hugging Face's field names (config_from_hf, config_to_hf)
    model.safetensors           the weights; or pytorch_model.bin, the older pickle-based format. A large model
                                is split by tensor into shards (model-00001-of-00002.safetensors, ...) that an
                                index file (model.safetensors.index.json) lists
    tokenizer.model             the SentencePiece tokenizer, the one lit-lora reads. The export writes transformers'
                                tokenizer.json and tokenizer_config.json beside it (lit_lora/convert/hf_tokenizer.py)

The matrices are ours under other names (HF_NAMES), not reordered: Hugging Face's rotary embedding pairs the two
halves of each head, as `apply_rope` does (Meta's pairs neighbours: see lit_lora/convert/meta.py).

Memory. Converting holds one copy of the weights: a safetensors file is read one tensor at a time, a .bin file is
memory-mapped, and the converted tensors are saved once. What is shared with the other formats (NameTable,
--dtype, checking and writing folders) is in lit_lora/convert/common.py.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from lit_lora.checkpoint import check_vocabulary, checked_config, load_model
from lit_lora.convert.common import (
    NameTable,
    apply_preset,
    check_converted_tensors,
    dtype_from_name,
    int_if_whole,
    read_tensors,
    save_safetensors,
    to_dtype,
    write_checkpoint,
)
from lit_lora.convert.hf_tokenizer import hf_tokenizer_files
from lit_lora.files import atomic_folder, check_links, read_json
from lit_lora.lora import merge_lora
from lit_lora.method_files import load_lora
from lit_lora.model import Config, ConfigError
from lit_lora.report import format_bytes, peak_memory_bytes
from lit_lora.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_JSON_COMPANIONS, Tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------

HF_NAMES = NameTable(
    format_name="Hugging Face",
    top={
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    layer_prefix="model.layers.",
    layer={
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.o_proj.weight": "attn.o_proj.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
    },
    ignored=("self_attn.rotary_emb.inv_freq",),  # a buffer some old checkpoints saved; we compute it (build_rope_cache)
)


def hf_to_lit_name(name: str) -> Optional[str]:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blocks.3.attn.q_proj.weight'; None for a buffer to skip."""
    return HF_NAMES.to_lit(name)


def lit_to_hf_name(name: str) -> str:
    """'blocks.3.attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    return HF_NAMES.from_lit(name)


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

# Our Config's fields, as Hugging Face's config.json calls them (for errors in its values)
HF_FIELDS = {"block_size": "max_position_embeddings", "vocab_size": "vocab_size", "padded_vocab_size": "vocab_size",
             "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_query_groups": "num_key_value_heads",
             "n_embd": "hidden_size", "intermediate_size": "intermediate_size", "norm_eps": "rms_norm_eps",
             "rope_base": "rope_theta", "tie_embeddings": "tie_word_embeddings"}


def config_from_hf(hf_config: dict, model_name: Optional[str] = None, source: Union[str, Path] = "config.json") -> Config:
    """Our Config from a Hugging Face `config.json` (`source`, for messages); `model_name` (a preset) names it and
    is checked against it.

    The embedding is not padded (padded_vocab_size = vocab_size) so every tensor keeps its shape.
    A config this model cannot reproduce, or a value no model can have, is an error naming the file and field.
    """
    def unsupported(field, why):
        raise ValueError(f"{source}: {field} = {json.dumps(hf_config.get(field))} is not supported: {why}")

    if hf_config.get("model_type") != "llama":
        unsupported("model_type", "lit-lora converts LLaMA-architecture models only (model_type \"llama\")")
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "LLaMA's SwiGLU uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf_config.get(field, False):
            unsupported(field, "the linear layers have no bias")
    # RoPE: rope_theta + rope_scaling in most checkpoints' config.json, one rope_parameters dict in transformers 5's
    for field in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf_config.get(field) or {}, dict):
            unsupported(field, "it must be an object with the RoPE settings (rope_type, factor, ...), or null")
    rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    rope_field = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        unsupported(rope_field, "only plain RoPE (\"default\") and Llama 3's frequency scaling (\"llama3\") are "
                                "implemented")
    rope_scaling = None
    if rope_type == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(field not in rope for field in fields):
            unsupported(rope_field, f"Llama 3 RoPE scaling needs {', '.join(fields)}")
        rope_scaling = dict(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                            high_freq_factor=rope["high_freq_factor"],
                            original_context=rope["original_max_position_embeddings"])
    missing = [field for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "vocab_size") if field not in hf_config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: is this a Hugging Face LlamaForCausalLM config?")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000))
    try:
        config = checked_config(
            block_size=hf_config.get("max_position_embeddings", 2048),
            vocab_size=hf_config["vocab_size"],
            padded_vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["num_hidden_layers"],
            n_head=hf_config["num_attention_heads"],
            n_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            n_embd=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_base=int_if_whole(rope_theta) if type(rope_theta) in (int, float) else rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except ConfigError as error:  # named as config.json names it
        field = HF_FIELDS.get(error.field, f"{rope_field}'s {error.field}")
        raise ValueError(f"{source}: {field} is {error.value!r}, which no LLaMA can have: {error.requirement}") from None
    if hf_config.get("head_dim") is not None and hf_config["head_dim"] != config.head_size:
        unsupported("head_dim", f"heads must split hidden_size evenly (hidden_size / num_attention_heads = "
                                f"{config.n_embd / config.n_head:g})")
    return apply_preset(config, model_name, str(source)) if model_name else config


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
        "rope_scaling": None if config.rope_scaling is None else {
            "rope_type": "llama3", "factor": config.rope_scaling["factor"],
            "low_freq_factor": config.rope_scaling["low_freq_factor"],
            "high_freq_factor": config.rope_scaling["high_freq_factor"],
            "original_max_position_embeddings": config.rope_scaling["original_context"]},
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }


# ---------------------------------------------------------------------------------------------------------------
# Which files hold the weights
# ---------------------------------------------------------------------------------------------------------------

HF_WEIGHTS = (  # (single file, index of shards), safetensors first
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


# The tokenizer files a checkpoint folder carries: SentencePiece's tokenizer.model (LLaMA, Llama 2), or Hugging Face's
# tokenizer.json (Llama 3, SmolLM2) with the files that give its BOS, EOS and stop tokens.
TOKENIZER_JSON_FILES = ("tokenizer.json", *TOKENIZER_JSON_COMPANIONS)


def hf_files_to_download(repo_files: list[str]) -> list[str]:
    """The files of a Hugging Face repo that convert_hf_checkpoint reads: config.json, the tokenizer (tokenizer.model,
    or tokenizer.json and its companions) and the weights in one format (safetensors where the repo has them, else
    .bin), as one file or shards with their index."""
    for single, index in HF_WEIGHTS:
        stem, extension = single.split(".")  # "model", "safetensors"
        weight_files = [file for file in repo_files
                        if file in (single, index) or re.fullmatch(rf"{stem}-\d+-of-\d+\.{extension}", file)]
        if weight_files:
            break
    else:
        readable = ", ".join(single for single, _ in HF_WEIGHTS)
        raise ValueError(f"The repo has no weights convert_hf.py can read ({readable}, or their shards); "
                         f"it holds {sorted(repo_files)[:20]}")
    if "config.json" not in repo_files:
        raise ValueError("The repo has no config.json, which convert_hf.py needs")
    if "tokenizer.model" in repo_files:
        # SentencePiece: with the chat template, in chat_template.jinja or inside tokenizer_config.json (Llama 2 chat)
        tokenizer_files = [file for file in ("tokenizer.model", "tokenizer_config.json", CHAT_TEMPLATE_FILE)
                           if file in repo_files]
    elif "tokenizer.json" in repo_files:
        tokenizer_files = [file for file in TOKENIZER_JSON_FILES if file in repo_files]
    else:
        raise ValueError("The repo has neither tokenizer.model nor tokenizer.json, one of which convert_hf.py needs")
    return ["config.json", *tokenizer_files, *sorted(weight_files)]


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


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> lit
# ---------------------------------------------------------------------------------------------------------------

def convert_hf_checkpoint(hf_dir: Union[str, Path], output_dir: Union[str, Path, None] = None,
                          model_name: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """A Hugging Face LlamaForCausalLM folder -> a lit-lora checkpoint folder (by default the same folder)."""
    hf_dir = Path(hf_dir)
    output_dir = Path(output_dir) if output_dir is not None else hf_dir
    torch_dtype = dtype_from_name(dtype)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {hf_dir}: is it a Hugging Face model folder? "
                                "Download one with `python checkpoints/download.py --repo_id ORG/NAME`.")
    check_links(hf_dir)
    weight_files = find_hf_weight_files(hf_dir)
    tokenizer = Tokenizer(hf_dir)  # tokenizer.model (SentencePiece), or tokenizer.json and the files beside it
    hf_config = read_json(hf_dir / "config.json", "download it again")
    config = config_from_hf(hf_config, model_name, hf_dir / "config.json")
    config.name = config.name or hf_dir.name
    # Where the weights came from, for the record: export_peft.py writes it as base_model_name_or_path, so the
    # whole path of the folder on this machine (config.json's _name_or_path may be one on the uploader's).
    config.extra["hf_model"] = str(hf_dir.resolve())
    check_vocabulary(config, hf_dir)

    state_dict = {}
    for file_number, path in enumerate(weight_files, 1):
        tensors_in_file = 0
        for hf_name, tensor in read_tensors(path, "download it again (checkpoints/download.py)"):
            lit_name = hf_to_lit_name(hf_name)
            if lit_name is not None:
                state_dict[lit_name] = to_dtype(tensor, torch_dtype)
                tensors_in_file += 1
        print(f"[{file_number}/{len(weight_files)}] {path.name}: {tensors_in_file} tensors")
    if config.tie_embeddings:  # one matrix for embed and lm_head: Hugging Face saves it once, as the embedding
        state_dict["lm_head.weight"] = state_dict["embed.weight"]
    check_converted_tensors(state_dict, config, str(hf_dir))
    # The chat template travels as chat_template.jinja; a SentencePiece repo may keep it in tokenizer_config.json only
    written = {CHAT_TEMPLATE_FILE: tokenizer.chat_template} if tokenizer.chat_template is not None else {}
    return write_checkpoint(output_dir, state_dict, config, tokenizer.files, hf_dir, written)


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
    model = load_model(checkpoint_dir, verify=True)  # memory-mapped: the checkpoint file is never written to
    if lora_path is not None:
        load_lora(model, lora_path)
        merge_lora(model)  # W0 + alpha/r B A: copy-on-write, so only the merged matrices take new memory
    state_dict = {}
    for name, tensor in model.state_dict().items():
        tied_copy = model.config.tie_embeddings and name == "lm_head.weight"  # transformers ties it to the embedding
        if "lora_" not in name and not tied_copy:  # the LoRA factors are merged into the weights
            state_dict[lit_to_hf_name(name)] = to_dtype(tensor, torch_dtype).contiguous()
    hf_config = config_to_hf(model.config)
    tokenizer = Tokenizer(checkpoint_dir)
    stop_ids = list(tokenizer.stop_ids)
    hf_config.update(bos_token_id=tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
                     eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids,
                     torch_dtype=str(next(iter(state_dict.values())).dtype).removeprefix("torch."))
    # A SentencePiece model gets the tokenizer.json transformers needs; a tokenizer.json model has its own files
    made = hf_tokenizer_files(tokenizer, model.config.block_size) if tokenizer.processor is not None else {}
    with atomic_folder(output_dir) as tmp_dir:
        (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_safetensors(state_dict, tmp_dir / "model.safetensors")
        for path in tokenizer.files:  # tokenizer.model (for SentencePiece itself), or tokenizer.json and its files
            shutil.copyfile(path, tmp_dir / path.name)
        for file_name, content in made.items():
            (tmp_dir / file_name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
        if tokenizer.chat_template is not None:  # where transformers 5 reads it, and 4 (tokenizer_config.json)
            (tmp_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
            config_file = tmp_dir / "tokenizer_config.json"
            tokenizer_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            config_file.write_text(json.dumps({**tokenizer_config, "chat_template": tokenizer.chat_template}, indent=2,
                                              ensure_ascii=False), encoding="utf-8")
    written = ["config.json", "model.safetensors", *sorted({path.name for path in tokenizer.files} | set(made))]
    print(f"Wrote {output_dir} ({', '.join(written)}); peak memory {format_bytes(peak_memory_bytes())}")
    return output_dir
