"""Meta's original LLaMA and Llama 2 weights -> a lit-lora checkpoint folder (convert_meta_checkpoint).

Meta's download holds, for each model, a folder (llama/7B, llama-2-13b, ...) of:
    consolidated.00.pth, ...    the weights. Models of 13B and up are split into model-parallel shards: every
                                shard holds a slice of every matrix (META_SHARD_DIM says along which dimension)
    params.json                 the architecture, with Meta's field names (config_from_meta)
and tokenizer.model in that folder or its parent.

The matrices are ours under other names (META_NAMES). The only change beyond renaming: rotary embeddings rotate
pairs of coordinates of each query/key head. Meta pairs neighbours (x0, x1), (x2, x3), ...; Hugging Face and
`apply_rope` pair the two halves (x_i, x_{i+hs/2}). Reordering the rows of the query and key weights
(`permute_meta_qk`) turns one layout into the other, so Meta -> lit needs it and Hugging Face -> lit does not.

Memory. The shards are memory-mapped (read from disk as needed, not copied into RAM) and the converted tensors
are saved once: one copy of the weights. What is shared with the other formats (NameTable, --dtype, checking and
writing the folder) is in lit_lora/convert/common.py.
"""

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from lit_lora.checkpoint import check_vocabulary, checked_config
from lit_lora.convert.common import NameTable, apply_preset, check_converted_tensors, dtype_from_name, int_if_whole
from lit_lora.convert.common import read_tensors, to_dtype, write_checkpoint
from lit_lora.files import read_json
from lit_lora.model import Config
from lit_lora.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Names, shards and the RoPE layout
# ---------------------------------------------------------------------------------------------------------------

META_NAMES = NameTable(
    format_name="Meta",
    top={
        "tok_embeddings.weight": "embed.weight",
        "norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
    },
    layer_prefix="layers.",
    layer={
        "attention_norm.weight": "attn_norm.weight",
        "attention.wq.weight": "attn.q_proj.weight",
        "attention.wk.weight": "attn.k_proj.weight",
        "attention.wv.weight": "attn.v_proj.weight",
        "attention.wo.weight": "attn.o_proj.weight",
        "ffn_norm.weight": "mlp_norm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: w2(silu(w1 x) * w3 x)
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    },
    ignored=("rope.freqs",),  # the original LLaMA saved its RoPE frequencies; we compute them
)

# How Meta's model-parallel shards split each matrix (fairscale layers): a column-parallel layer splits its
# outputs (rows, dim 0), a row-parallel one its inputs (columns, dim 1), the embedding its n_embd columns.
# The norms are not listed: every shard holds the whole vector.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def merge_meta_shards(shards: list[dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors from model-parallel shards: the slices concatenated along the dimension they were split on."""
    for name in shards[0]:
        split_dim = META_SHARD_DIM.get(name.split(".")[-2])  # 'layers.0.attention.wq.weight' -> 'wq'
        if len(shards) == 1 or split_dim is None:  # a single shard, or a norm that every shard holds whole
            yield name, shards[0][name]
        else:
            yield name, torch.cat([shard[name] for shard in shards], dim=split_dim)


def permute_meta_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of Meta's query or key weight (n_heads * hs, n_embd) from interleaved RoPE pairs to
    rotate-half pairs (see the module docstring). `n_heads` is n_head for wq and n_query_groups for wk.

    Within a head, Meta's row 2j + c (pair j, coordinate c of the pair) becomes our row c * hs/2 + j.
    """
    rows, cols = weight.shape
    head_size = rows // n_heads
    return weight.view(n_heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# Config and conversion
# ---------------------------------------------------------------------------------------------------------------

def config_from_meta(params: dict, vocab_size: int, model_size: str) -> Config:
    """Our Config from Meta's `params.json`, checked against the preset `model_size` (which gives the context
    length, absent from params.json). `vocab_size` is params.json's, or the tokenizer's where that says -1."""
    n_embd = params["dim"]
    # The SwiGLU hidden size, as Meta's model.py computes it: 2/3 of 4 * dim, times ffn_dim_multiplier
    # (Llama 2 70B: 1.3), rounded up to a multiple of multiple_of. 7B: 11008; 70B: 28672.
    hidden_size = int(2 * 4 * n_embd / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden_size = int(params["ffn_dim_multiplier"] * hidden_size)
    multiple_of = params.get("multiple_of", 256)
    intermediate_size = (hidden_size + multiple_of - 1) // multiple_of * multiple_of
    config = checked_config(
        vocab_size=vocab_size,
        padded_vocab_size=vocab_size,
        n_layer=params["n_layers"],
        n_head=params["n_heads"],
        n_query_groups=params.get("n_kv_heads") or params["n_heads"],
        n_embd=n_embd,
        intermediate_size=intermediate_size,
        norm_eps=params.get("norm_eps", 1e-6),
        rope_base=int_if_whole(params.get("rope_theta", 10000)),
    )
    return apply_preset(config, model_size, "params.json")


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
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except Exception:  # Meta's Llama 3 download ships tiktoken's BPE ranks under the same name
        raise ValueError(f"{tokenizer_path} is not a SentencePiece model: Meta's Llama 3 downloads ship tiktoken's "
                         "tokenizer. Convert Llama 3 from its Hugging Face repository instead (tokenizer.json): "
                         "checkpoints/download.py, then checkpoints/convert_hf.py") from None
    params = read_json(meta_dir / "params.json", "download it again from Meta")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:  # the original LLaMA's params.json says -1: the tokenizer decides
        vocab_size = tokenizer.vocab_size
    config = config_from_meta(params, vocab_size, model_size)
    check_vocabulary(config, tokenizer_path)

    print(f"Reading {len(shard_paths)} shard(s) from {meta_dir} (memory-mapped)")
    shards = [dict(read_tensors(path, "download it again from Meta")) for path in shard_paths]
    state_dict = {}
    for meta_name, tensor in merge_meta_shards(shards):
        lit_name = META_NAMES.to_lit(meta_name)
        if lit_name is None:
            continue
        if lit_name.endswith("attn.q_proj.weight"):
            tensor = permute_meta_qk(tensor, config.n_head)
        elif lit_name.endswith("attn.k_proj.weight"):
            tensor = permute_meta_qk(tensor, config.n_query_groups)
        state_dict[lit_name] = to_dtype(tensor, torch_dtype)
    check_converted_tensors(state_dict, config, str(meta_dir))
    return write_checkpoint(output_dir, state_dict, config, tokenizer.files, meta_dir)
