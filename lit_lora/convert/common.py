"""What every converter shares: Meta and Hugging Face checkpoints -> lit-lora, lit-lora -> Hugging Face and PEFT.

LLaMA is published in two formats, and both hold the same matrices as `lit_lora/model.py` under other names:

- Meta's original release (LLaMA, Llama 2): `consolidated.NN.pth` shards and `params.json`; read by
  `lit_lora/convert/meta.py`.
- Hugging Face's `LlamaForCausalLM` (Llama 2 `-hf` repos, TinyLlama, OpenLLaMA): `config.json` and
  `model.safetensors` or `pytorch_model.bin`; read and written by `lit_lora/convert/hf.py` (its tokenizer files
  by `lit_lora/convert/hf_tokenizer.py`). LoRA files travel to and from Hugging Face's PEFT in `lit_lora/convert/peft.py`.

Each of those files reads alone; this one holds what they all use, in one place:

- `NameTable`: one format's names for our tensors, read in either direction;
- the `--dtype` choice (`DtypeName`, `dtype_from_name`, `to_dtype`);
- `apply_preset`: a preset named on the command line, checked against the config read from the checkpoint;
- checking the converted tensors, and writing the lit-lora checkpoint folder and safetensors files.

Memory. Converting holds one copy of the weights, never two: the converters read them lazily (one tensor at a
time, or memory-mapped: read from disk as needed, not copied into RAM), and the converted tensors are collected
into one state dict that is saved once. For 7B in bfloat16 that is about 13.5 GB. Every folder is written into
a temporary folder first and moved into place at the end (`lit_lora.files.atomic_folder`), so an interrupted
conversion leaves no half-written folder.
"""

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lit_lora.checkpoint import check_tensors, save_checkpoint_dir
from lit_lora.files import current_umask, load_torch_file
from lit_lora.model import Config, LLaMA
from lit_lora.report import format_bytes, peak_memory_bytes

# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------


def rename_by_tables(name: str, top: dict[str, str], layer: dict[str, str], layer_prefix: str,
                     new_layer_prefix: str) -> Optional[str]:
    """`name` in another naming: a whole-model tensor through `top`, a tensor of block i (`{layer_prefix}{i}.rest`)
    through `layer` (-> `{new_layer_prefix}{i}.{layer[rest]}`). None if neither table holds it."""
    if name in top:
        return top[name]
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", name)
    if match and match.group(2) in layer:
        block_number, name_in_block = match.groups()
        return f"{new_layer_prefix}{block_number}.{layer[name_in_block]}"
    return None


@dataclass(frozen=True)
class NameTable:
    """How one format names the tensors of `lit_lora/model.py`. The table maps its names to ours; the inverse
    direction is the same table read backwards, so each mapping is written once."""
    format_name: str  # "Hugging Face", "Meta": for error messages
    top: dict[str, str]  # whole-model tensors (embedding, final norm, head): their name -> ours
    layer_prefix: str  # what comes before the block number in their names ("model.layers."); ours is "blocks."
    layer: dict[str, str]  # the tensors of one block: their name after "{layer_prefix}{i}." -> ours after "blocks.{i}."
    ignored: tuple[str, ...] = ()  # names ending so are buffers some checkpoints saved; we compute them

    def to_lit(self, name: str) -> Optional[str]:
        """Their name -> ours; None for a buffer to skip; an error naming every tensor the format has otherwise."""
        if name.endswith(self.ignored):
            return None
        lit_name = rename_by_tables(name, self.top, self.layer, self.layer_prefix, "blocks.")
        if lit_name is None:
            raise ValueError(f"Unknown {self.format_name} tensor {name!r}: a LLaMA checkpoint has only "
                             f"{', '.join(self.top)} and {self.layer_prefix}N.{{{', '.join(self.layer)}}}")
        return lit_name

    def from_lit(self, name: str) -> str:
        """Our name -> theirs."""
        top = {lit_name: their_name for their_name, lit_name in self.top.items()}
        layer = {lit_name: their_name for their_name, lit_name in self.layer.items()}
        their_name = rename_by_tables(name, top, layer, "blocks.", self.layer_prefix)
        if their_name is None:
            raise ValueError(f"No {self.format_name} name for lit-lora tensor {name!r}")
        return their_name


# ---------------------------------------------------------------------------------------------------------------
# dtypes and configs
# ---------------------------------------------------------------------------------------------------------------

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


def to_dtype(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """`tensor` stored as `dtype`, or as it is where `dtype` is None (--dtype left out)."""
    return tensor.to(dtype) if dtype is not None else tensor


# The config fields that decide what the model computes: a preset given by name must agree with the checkpoint.
CHECKED_FIELDS = ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "norm_eps", "rope_base",
                  "rope_scaling", "tie_embeddings")


def int_if_whole(number: float) -> Union[int, float]:
    """10000.0 -> 10000 (config files write RoPE's base as a float, our presets as an int); 0.5 stays 0.5."""
    return int(number) if float(number).is_integer() else number


def apply_preset(inferred: Config, preset: str, source: str) -> Config:
    """The preset `preset` (its name and context length), checked against the config read from `source`."""
    config = Config.from_name(preset, vocab_size=inferred.vocab_size, padded_vocab_size=inferred.padded_vocab_size)
    for field in CHECKED_FIELDS:
        if getattr(config, field) != getattr(inferred, field):
            raise ValueError(f"Preset {preset!r} does not match {source}: its {field} is {getattr(config, field)}, "
                             f"{source} says {getattr(inferred, field)}")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Checking and writing what was converted
# ---------------------------------------------------------------------------------------------------------------

def check_converted_tensors(state_dict: dict[str, torch.Tensor], config: Config, source: str) -> None:
    """Every tensor the model needs, no other, with the shape it needs (read off a model on the meta device)."""
    with torch.device("meta"):
        expected_shapes = {name: tensor.shape for name, tensor in LLaMA(config).state_dict().items()}
    check_tensors(state_dict, expected_shapes, source,
                  hint=f"The weights do not match their config ({config.n_layer} layers, n_embd {config.n_embd}, "
                       f"vocabulary {config.padded_vocab_size}): both must come from the same model.")


def write_checkpoint(output_dir: Path, state_dict: dict, config: Config, tokenizer_files: list[Path],
                     source: Union[str, Path], texts: Optional[dict[str, str]] = None) -> Path:
    """The folder that `lit_lora.checkpoint.load_model` reads (lit_model.pth, model_config.json and the tokenizer's
    files, `Tokenizer.files`), written whole, with what it took; refused if a weight of `source` is not finite."""
    start = time.perf_counter()
    check_finite(state_dict, source, "the checkpoint is damaged: download it again")
    print(f"Checked {len(state_dict)} tensors for NaN and infinite values in {time.perf_counter() - start:.1f} s")
    save_checkpoint_dir(output_dir, state_dict, config, tokenizer_files, texts)
    size = (output_dir / "lit_model.pth").stat().st_size
    print(f"Wrote {output_dir} (lit_model.pth {format_bytes(size)}); peak memory {format_bytes(peak_memory_bytes())}")
    return output_dir


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, giving the file the usual permissions (-rw-r--r-- under umask 022): save_file
    creates it readable by its owner only."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())


# ---------------------------------------------------------------------------------------------------------------
# Reading weights from outside
# ---------------------------------------------------------------------------------------------------------------

def read_tensors(path: Path, hint: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weight file, one at a time: a .safetensors file reads each tensor when asked; a torch
    file (.bin, .pth) is memory-mapped and never runs code. A file that is truncated, damaged or not of its format
    is one error naming it and `hint` (what to do)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as weights_file:
                for name in weights_file.keys():
                    yield name, weights_file.get_tensor(name)
        except OSError:
            raise
        except Exception as error:  # safetensors' SafetensorError: incomplete metadata, a header too large, ...
            raise ValueError(f"{path} cannot be read as a safetensors file ({type(error).__name__}: "
                             f"{str(error)[:200]}). It may be incomplete or damaged: {hint}.") from None
    else:
        tensors = load_torch_file(path, "a state dict of tensors", hint, mmap=True)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors: {hint}.")
        yield from tensors.items()


def check_finite(tensors: dict[str, torch.Tensor], source: Union[str, Path], hint: str) -> None:
    """Every floating-point tensor finite: weights with NaN or infinite values would only ever give garbage."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: the tensor {name} holds NaN or infinite values: {hint}.")
