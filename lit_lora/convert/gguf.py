"""GGUF <-> lit-lora: llama.cpp's files in (convert_gguf_checkpoint) and out (export_gguf_checkpoint).

A GGUF file (llama.cpp, ollama, LM Studio) is one file: metadata (the architecture's shape, the tokenizer's tokens,
merges or scores and special ids, the chat template) and the tensors, each in its own type (F32, F16, BF16, or
blocks of quantized weights: Q8_0, Q4_0, Q4_1, the K-quants ...). lit-lora reads and writes it with the `gguf`
package, llama.cpp's own Python library (`pip install -e ".[gguf]"`), which also (de)quantizes, in numpy.

Two things differ from our layout:
- Names (GGUF_NAMES): blk.N.attn_q.weight is our blocks.N.attn.q_proj.weight, token_embd the embedding, output
  the lm_head (absent when the embeddings are tied).
- The query and key rows are in Meta's interleaved RoPE layout, as llama.cpp's converter permutes them from
  Hugging Face's: convert_meta.py's permute_meta_qk undoes it, `interleave_qk` does it.

The tokenizer travels as metadata: a byte-level BPE (`gpt2`: Llama 3, SmolLM2; its tokens, merges and the name of
its pre-tokenizer, `tokenizer.ggml.pre`) or a SentencePiece model (`llama`: LLaMA 1 and 2; its tokens, scores and
token types). Importing writes the files our Tokenizer reads (tokenizer.json, or tokenizer.model); exporting reads
them back into metadata.
"""

import os
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from lit_lora.checkpoint import CHECKSUMS, check_vocabulary, checked_config, load_model
from lit_lora.convert.common import NameTable, check_converted_tensors, int_if_whole, to_dtype, write_checkpoint
from lit_lora.convert.gguf_file import GGUFFile, import_gguf
from lit_lora.convert.gguf_tokenizer import add_tokenizer_metadata, tokenizer_files_from_gguf
from lit_lora.convert.meta import permute_meta_qk
from lit_lora.files import atomic_write
from lit_lora.lora import merge_lora
from lit_lora.method_files import load_lora, read_lora_file
from lit_lora.model import Config, ConfigError, llama3_scaled_frequencies
from lit_lora.report import format_bytes, peak_memory_bytes
from lit_lora.tokenizer import TOKENIZER_JSON_COMPANIONS, Tokenizer

GGUF_NAMES = NameTable(
    format_name="GGUF",
    top={"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"},
    layer_prefix="blk.",
    layer={
        "attn_norm.weight": "attn_norm.weight",
        "attn_q.weight": "attn.q_proj.weight",
        "attn_k.weight": "attn.k_proj.weight",
        "attn_v.weight": "attn.v_proj.weight",
        "attn_output.weight": "attn.o_proj.weight",
        "ffn_norm.weight": "mlp_norm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    },
    ignored=("rope_freqs.weight",),  # Llama 3's RoPE scaling as per-frequency factors: read into the config
)


def interleave_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """permute_meta_qk's inverse: a query or key weight from our rotate-half layout to the interleaved one that
    llama.cpp keeps (within a head, our row c * hs/2 + j becomes row 2j + c)."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> lit
# ---------------------------------------------------------------------------------------------------------------

# The longest context lit-lora accepts: the model keeps RoPE tables (cos and sin, each context x head size floats)
# for its whole context, so a context of 10**12 positions would never fit. Llama 3.1's is 2**17 positions.
MAX_CONTEXT = 2**20


def config_from_gguf(file: GGUFFile) -> Config:
    """Our Config from a GGUF file's llama.* metadata, checked against the tensors the file holds before anything
    that grows with it (the blocks, the context, the shapes) is built; a value no model can have is an error naming
    the key."""
    architecture = file.get("general.architecture", kind=str)
    if architecture != "llama":
        raise ValueError(f"{file.path}: general.architecture is {architecture!r}: lit-lora converts files of the "
                         "llama architecture only (LLaMA, Llama 2 and 3, TinyLlama, SmolLM2, ...)")
    keys = {"block_size": "llama.context_length", "n_layer": "llama.block_count", "n_embd": "llama.embedding_length",
            "intermediate_size": "llama.feed_forward_length", "n_head": "llama.attention.head_count",
            "n_query_groups": "llama.attention.head_count_kv", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
            "rope_base": "llama.rope.freq_base", "vocab_size": "llama.vocab_size"}
    required = ("block_size", "n_layer", "n_embd", "intermediate_size", "n_head")  # llama.cpp needs them too
    values = {field: file.get(key, ... if field in required else None,
                              kind=float if field in ("norm_eps", "rope_base") else int) for field, key in keys.items()}
    check_block_count(file, values["n_layer"])
    if values["block_size"] > MAX_CONTEXT:
        raise file.error("llama.context_length", f"is {values['block_size']:,}, more than the {MAX_CONTEXT:,} "
                                                 "positions lit-lora accepts (it keeps RoPE tables for the whole context)")
    tokens = file.get("tokenizer.ggml.tokens", kind=str, array=True)
    values["vocab_size"] = values["vocab_size"] or len(tokens)
    values["n_query_groups"] = values["n_query_groups"] or values["n_head"]
    values["rope_base"] = values["rope_base"] or 10000
    if values["norm_eps"] is not None:  # stored in float32: 1e-05 reads 9.99999975e-06; keep its shortest spelling
        values["norm_eps"] = float(str(np.float32(values["norm_eps"])))
    values["rope_base"] = int_if_whole(float(str(np.float32(values["rope_base"]))))
    try:
        config = checked_config(name=file.get("general.name", "", kind=str) or file.path.stem,
                                padded_vocab_size=values["vocab_size"],
                                tie_embeddings="output.weight" not in file.tensors, **values)
    except ConfigError as error:
        raise ValueError(f"{file.path}: {keys.get(error.field, error.field)} is {error.value!r}, which no model can "
                         f"have: {error.requirement}") from None
    check_tensor_shapes(file, config)
    rope_dimension = file.get("llama.rope.dimension_count", config.head_size, kind=int)
    if rope_dimension != config.head_size:
        raise ValueError(f"{file.path}: llama.rope.dimension_count is {rope_dimension}, not the head size "
                         f"{config.head_size}: RoPE on part of each head is not LLaMA's")
    if len(tokens) > config.vocab_size:
        raise file.error("tokenizer.ggml.tokens", f"holds {len(tokens):,} tokens, more than the model's vocabulary "
                                                  f"of {config.vocab_size:,} (token_embd.weight's rows)")
    try:
        return checked_config(**{**asdict(config), "rope_scaling": rope_scaling_from_factors(file, config)})
    except ConfigError as error:
        raise ValueError(f"{file.path}: the RoPE scaling's {error.field} is {error.value!r}: {error.requirement}") from None


def check_block_count(file: GGUFFile, block_count: int) -> None:
    """llama.block_count against the blocks whose tensors the file holds (blk.N.*), before anything loops over it."""
    blocks = {int(match.group(1)) for name in file.tensors if (match := re.match(r"blk\.(\d+)\.", name))}
    if len(blocks) != block_count or (blocks and max(blocks) != block_count - 1):
        held = f"blk.{min(blocks)} to blk.{max(blocks)}, {len(blocks)} of them" if blocks else "none"
        raise file.error("llama.block_count", f"is {block_count:,}, but the file holds the tensors of blocks {held}")


def check_tensor_shapes(file: GGUFFile, config: Config) -> None:
    """Every tensor the config makes, of its shape, and no other, checked on the tensor table before any tensor is
    read or rearranged (q and k rows are permuted head by head: rows the head count does not divide would not
    split). The shapes are computed, not read off a model: a damaged file's sizes could overflow even a model built
    on the meta device. (check_converted_tensors compares them with the model's after conversion.)"""
    n, kv, ff = config.n_embd, config.n_query_groups * config.head_size, config.intermediate_size
    block = {"attn_norm.weight": (n,), "attn_q.weight": (n, n), "attn_k.weight": (kv, n), "attn_v.weight": (kv, n),
             "attn_output.weight": (n, n), "ffn_norm.weight": (n,), "ffn_gate.weight": (ff, n),
             "ffn_up.weight": (ff, n), "ffn_down.weight": (n, ff)}
    expected = {"token_embd.weight": (config.padded_vocab_size, n), "output_norm.weight": (n,),
                **({} if config.tie_embeddings else {"output.weight": (config.padded_vocab_size, n)}),
                **{f"blk.{i}.{name}": shape for i in range(config.n_layer) for name, shape in block.items()}}
    for name in file.tensors:
        shape = (config.head_size // 2,) if name == "rope_freqs.weight" else expected.get(name)
        if shape is None:
            raise ValueError(f"{file.path}: tensor {name} is not one of a llama model's, which are "
                             f"{', '.join(GGUF_NAMES.top)}, rope_freqs.weight and "
                             f"blk.N.{{{', '.join(GGUF_NAMES.layer)}}} for N below llama.block_count ({config.n_layer})")
        if file.shape(name) != shape:
            raise file.error(f"tensor {name}", f"({GGUF_NAMES.to_lit(name) or 'RoPE scaling'}) has shape "
                                               f"{file.shape(name)}, but the metadata (llama.embedding_length, "
                                               f"feed_forward_length, vocab_size, head counts) gives it {shape}")
    missing = [name for name in expected if name not in file.tensors]
    if missing:
        raise ValueError(f"{file.path} lacks tensor {missing[0]} ({len(missing)} missing), which a llama model of its "
                         "metadata holds: it is not a whole model file")


# Llama 3.1 and 3.2's RoPE scaling (lit_lora/model.py's rope_scaling), which llama.cpp stores as per-frequency factors
KNOWN_ROPE_SCALINGS = [dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)
                       for factor in (8.0, 32.0)]


def rope_scaling_from_factors(file: GGUFFile, config: Config) -> Optional[dict]:
    """The rope_scaling whose factors the file's rope_freqs.weight holds (theta / scaled theta, per frequency), or
    None without that tensor. Factors of another scaling are refused."""
    if "rope_freqs.weight" not in file.tensors:
        return None
    factors = file.tensor("rope_freqs.weight")
    theta = 1.0 / (config.rope_base ** (torch.arange(0, config.head_size, 2).float() / config.head_size))
    for scaling in KNOWN_ROPE_SCALINGS:
        if torch.allclose(theta / llama3_scaled_frequencies(theta, **scaling), factors, rtol=1e-4):
            return scaling
    raise ValueError(f"{file.path}: its rope_freqs.weight is not the factors of Llama 3.1's or 3.2's RoPE scaling: "
                     "this model's RoPE scaling is not one lit-lora implements")


def convert_gguf_checkpoint(gguf_path: Union[str, Path], output_dir: Union[str, Path],
                            dtype: Optional[str] = None) -> Path:
    """A GGUF file of the llama architecture -> a lit-lora checkpoint folder, the same layout as convert_hf's: the
    metadata and the tokenizer checked first, then each tensor dequantized as it is read (to float32, or `dtype`),
    q and k back in rotate-half order, the tokenizer as the files our Tokenizer reads, the chat template beside it."""
    from lit_lora.convert.common import dtype_from_name

    file, output_dir, torch_dtype = GGUFFile(gguf_path), Path(output_dir), dtype_from_name(dtype)
    config = config_from_gguf(file)
    config.extra["gguf"] = {"source": str(file.path.resolve()), "pre": file.get("tokenizer.ggml.pre", None, kind=str)}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer_files = tokenizer_files_from_gguf(file, Path(folder))
        try:
            check_vocabulary(config, Path(folder))
        except ValueError as error:  # said of the GGUF file: the temporary folder is gone when the error is read
            raise ValueError(f"{file.path}: its tokenizer metadata (tokenizer.ggml.*) makes no tokenizer lit-lora "
                             f"reads: {str(error).replace(folder + os.sep, '')}") from None
        start, state_dict = time.perf_counter(), {}
        for name in file.tensors:
            lit_name = GGUF_NAMES.to_lit(name)
            if lit_name is None:
                continue
            tensor = file.tensor(name)
            if lit_name.endswith("attn.q_proj.weight"):
                tensor = permute_meta_qk(tensor, config.n_head)
            elif lit_name.endswith("attn.k_proj.weight"):
                tensor = permute_meta_qk(tensor, config.n_query_groups)
            state_dict[lit_name] = to_dtype(tensor, torch_dtype)
        if config.tie_embeddings:
            state_dict["lm_head.weight"] = state_dict["embed.weight"]
        print(f"Read {len(file.tensors)} tensors of {file.path.name} in {time.perf_counter() - start:.1f} s")
        check_converted_tensors(state_dict, config, str(file.path))
        return write_checkpoint(output_dir, state_dict, config, tokenizer_files, file.path)


# ---------------------------------------------------------------------------------------------------------------
# lit -> GGUF
# ---------------------------------------------------------------------------------------------------------------

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what export_gguf writes the matrices as; vectors (norms) stay F32


def export_gguf_checkpoint(checkpoint_dir: Union[str, Path], output_path: Union[str, Path],
                           lora_path: Union[str, Path, None] = None,
                           outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16") -> Path:
    """A lit-lora checkpoint folder (with a LoRA merged in, if given) -> a GGUF file that llama.cpp and ollama load
    and prompt: the llama architecture's metadata, the tensors (q and k interleaved as llama.cpp keeps them), the
    tokenizer, its special ids and the chat template. Tensors are converted and written one at a time."""
    gguf = import_gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    output_path = Path(output_path)
    check_output_path(output_path, Path(checkpoint_dir), lora_path)
    model = load_model(checkpoint_dir, verify=True)  # memory-mapped; checked against the checksum it was written with
    if lora_path is not None:
        load_lora(model, lora_path)
        merge_lora(model)  # W0 + alpha/r B A: llama.cpp runs the merged model
        say_what_is_merged(lora_path, model)
    config, tokenizer = model.config, Tokenizer(checkpoint_dir)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    tensors = {GGUF_NAMES.from_lit(name): name for name in model.state_dict()
               if "lora_" not in name and not (config.tie_embeddings and name == "lm_head.weight")}

    if config.rope_scaling is not None:
        tensors["rope_freqs.weight"] = None  # not a parameter: the factors, computed from the config

    def value(gguf_name: str) -> torch.Tensor:
        """A tensor as llama.cpp keeps it, in fp32: q and k interleaved."""
        name = tensors[gguf_name]
        if name is None:
            return rope_factors(config)
        tensor = model.get_parameter(name).detach().float()
        if name.endswith("attn.q_proj.weight"):
            return interleave_qk(tensor, config.n_head)
        if name.endswith("attn.k_proj.weight"):
            return interleave_qk(tensor, config.n_query_groups)
        return tensor

    def kind(shape: tuple) -> Any:
        """Matrices in `outtype` (Q8_0 needs rows of whole blocks of 32: others stay F16); vectors in F32."""
        if len(shape) == 1:
            return gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            return gguf.GGMLQuantizationType.F16
        return qtype

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        add_model_metadata(writer, config, outtype)
        add_tokenizer_metadata(writer, tokenizer, config)
        for gguf_name, name in tensors.items():  # the tensor table first: shapes and sizes, no data in memory
            shape = tuple(rope_factors(config).shape if name is None else model.get_parameter(name).shape)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind(shape))
            dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
                kind(shape), np.uint8)  # other types are given as bytes: their shape in bytes
            writer.add_tensor_info(gguf_name, byte_shape if dtype is np.uint8 else shape, np.dtype(dtype),
                                   int(np.prod(byte_shape)), raw_dtype=kind(shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name in tensors:  # then the data, one tensor at a time
            tensor = value(gguf_name)
            writer.write_tensor_data(gguf.quants.quantize(tensor.numpy(), kind(tuple(tensor.shape))))
        writer.close()

    atomic_write(output_path, write)
    print(f"Wrote {output_path} ({outtype}, {output_path.stat().st_size / 1e6:.1f} MB, {len(tensors)} tensors); "
          f"peak memory {format_bytes(peak_memory_bytes())}")
    return output_path


# The files of a checkpoint folder that an export reads (those of them it has)
CHECKPOINT_INPUTS = ("lit_model.pth", "model_config.json", CHECKSUMS, "tokenizer.model", "tokenizer.json",
                     *TOKENIZER_JSON_COMPANIONS)


def check_output_path(output_path: Path, checkpoint_dir: Path, lora_path: Union[str, Path, None]) -> None:
    """Refuse, before anything is read or written, an output path that is a folder, or that is (or is inside) a file
    the export reads: the GGUF file would replace the weights, tokenizer or LoRA file it is being made from."""
    if output_path.is_dir():
        raise ValueError(f"{output_path} is a folder: name the .gguf file to write in it, e.g. "
                         f"{output_path / 'model.gguf'}")
    inputs = {checkpoint_dir / name: f"the {name} of the checkpoint {checkpoint_dir}" for name in CHECKPOINT_INPUTS}
    if lora_path is not None:
        inputs[Path(lora_path)] = "the LoRA file"
    for source, role in inputs.items():
        inside = source.resolve() in output_path.resolve().parents
        if inside or same_file(source, output_path):
            raise ValueError(f"{output_path} is {'inside ' if inside else ''}{role}, which the export reads: write "
                             "the .gguf file elsewhere")


def same_file(a: Path, b: Path) -> bool:
    """The same file: the same path once links are followed, or a hard link."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def say_what_is_merged(lora_path: Union[str, Path], model) -> None:
    """Two things a reader of the GGUF file should know, said once: a QLoRA file is merged into the unquantized base
    (as export_hf does), and llama.cpp prompts with the file's chat template, not in the Alpaca format."""
    quantization = read_lora_file(lora_path).get("quantization")
    if quantization is not None:
        print(f"{lora_path} was trained on a {quantization} (4-bit) base: it is merged into the unquantized weights of "
              "the checkpoint folder, and the file holds no 4-bit weights (choose --outtype q8_0 for a small file)")
    if (model.prompt_format or {}).get("style") == "alpaca":
        print(f"{lora_path} was finetuned in the Alpaca prompt format: prompt llama.cpp and ollama in it (a raw "
              "prompt, or a Modelfile TEMPLATE: howto/gguf.md), not with the chat template in the file")


def rope_factors(config: Config) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp keeps it: theta / scaled theta per frequency (rope_freqs.weight)."""
    theta = 1.0 / (config.rope_base ** (torch.arange(0, config.head_size, 2).float() / config.head_size))
    return theta / llama3_scaled_frequencies(theta, **config.rope_scaling)


def add_model_metadata(writer, config: Config, outtype: str) -> None:
    gguf = import_gguf()
    writer.add_name(config.name or "lit-lora model")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_freq_base(float(config.rope_base))
    writer.add_rope_dimension_count(config.head_size)
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.padded_vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
