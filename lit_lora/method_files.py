"""The files LoRA and LLaMA-Adapter write: what finetuning saves and generation loads.

Both are self-describing (lit_lora/checkpoint.py's save_method_file): the method's tensors, the config that
rebuilds its modules, the base model's config and a fingerprint of its weights, so that loading needs no repeated
flags and a file meant for another base model is refused by name. Both are read and checked alike
(read_method_file), and loading checks everything before it touches the model: on an error the model is left as
it was.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from lit_lora.adapter import (
    AdapterConfig,
    adapter_state_dict,
    apply_adapter,
    is_adapter_parameter,
)
from lit_lora.checkpoint import (
    check_base_model,
    check_tensors,
    read_method_file,
    save_method_file,
)
from lit_lora.lora import (
    LoRAConfig,
    apply_lora,
    lora_modules,
    lora_state_dict,
    target_linears,
)
from lit_lora.model import LLaMA
from lit_lora.quantize import QUANTIZE_MODES

LORA_WRITER = "finetune/lora.py (<out_dir>/lit_lora_finetuned.pth)"
ADAPTER_WRITER = "finetune/adapter.py (<out_dir>/lit_adapter_finetuned.pth)"

# ---------------------------------------------------------------------------------------------------------
# LoRA


def save_lora(model: LLaMA, path: Union[str, Path], state_dict: Optional[dict] = None) -> None:
    """The LoRA tensors, their hyperparameters, the base model's config and, for QLoRA, the 4-bit format of the
    base it was trained on (the file loads on the unquantized base too). The tensors come from the model, or from
    `state_dict` (the training loop passes the ones it gathered from all devices)."""
    tensors = lora_state_dict(model) if state_dict is None else state_dict
    save_method_file(path, "lora", {name: t for name, t in tensors.items() if "lora_" in name}, model.lora_config,
                     model, quantization=getattr(model, "quantization", None), prompt=getattr(model, "prompt_format", None))


def read_lora_file(path: Union[str, Path]) -> dict:
    """A LoRA file's dict ({"lora": tensors, "lora_config", "base_config", ...}), every field and tensor checked."""
    data = read_method_file(path, "lora", LoRAConfig, "a LoRA file", LORA_WRITER,
                            optional=("quantization", "prompt", "training"))
    if not isinstance(data.get("training", {}), dict):  # how it was trained (finetune/dpo.py records it)
        raise ValueError(f"{path}: training is {data['training']!r}, not a record of how it was trained. Write the "
                         f"file again with {LORA_WRITER}.")
    if data.get("quantization") not in (None, *QUANTIZE_MODES):
        raise ValueError(f"{path}: quantization is {data['quantization']!r}, not one of {', '.join(QUANTIZE_MODES)} "
                         f"or none. Write the file again with {LORA_WRITER}.")
    return data


def load_lora(model: LLaMA, path: Union[str, Path]) -> LLaMA:
    """Add LoRA to `model` with the file's hyperparameters and load its tensors; every mismatch is an error."""
    data = read_lora_file(path)
    config = LoRAConfig(**data["lora_config"])
    check_base_model(data, model.config, path, getattr(model, "base_fingerprint", None))
    if hasattr(model, "lora_config") and model.lora_config != config:
        raise ValueError(f"{path} holds LoRA {config}, but the model already has {model.lora_config}")
    if any(module.merged for module in lora_modules(model)):
        raise ValueError(f"Cannot load {path} into a model whose LoRA is merged: W holds W0 + the old update. "
                         "Call unmerge_lora(model) first (then load, then merge_lora(model) again).")
    expected = {}
    for prefix, parent, name in target_linears(model, config.targets):
        linear = getattr(parent, name)
        expected[f"{prefix}.lora_A"] = (config.r, linear.in_features)
        expected[f"{prefix}.lora_B"] = (linear.out_features, config.r)
    check_tensors(data["lora"], expected, path, "Was it trained with other LoRA targets or another model?")
    if not hasattr(model, "lora_config"):
        apply_lora(model, **asdict(config))
    model.load_state_dict(data["lora"], strict=False)
    model.prompt_format = data.get("prompt")  # the format it was finetuned in (lit_lora/chat.py generates in it)
    return model


# ---------------------------------------------------------------------------------------------------------
# LLaMA-Adapter


def save_adapter(model: LLaMA, path: Union[str, Path], state_dict: Optional[dict] = None) -> None:
    """The adapter's prompts and gates (a few MB for 7B), with the hyperparameters and base config to load them.
    The tensors come from the model, or from `state_dict` (the training loop passes the ones it gathered)."""
    if getattr(model, "adapter_config", None) is None:
        raise ValueError("The model has no adapter to save: call apply_adapter(model) first")
    tensors = adapter_state_dict(model) if state_dict is None else state_dict
    save_method_file(path, "adapter", {name: t for name, t in tensors.items() if is_adapter_parameter(name)},
                     model.adapter_config, model, prompt=getattr(model, "prompt_format", None))


def read_adapter_file(path: Union[str, Path]) -> dict:
    """An adapter file's dict ({"adapter": tensors, "adapter_config", "base_config", ...}), everything checked."""
    return read_method_file(path, "adapter", AdapterConfig, "an adapter file", ADAPTER_WRITER, optional=("prompt",))


def load_adapter(model: LLaMA, path: Union[str, Path]) -> LLaMA:
    """Load a saved adapter into a model holding its base weights, applying the adapter first if needed.

    Everything is checked before the model is touched: the base model's shape (and, with a warning, its
    weights' fingerprint), the adapter hyperparameters, the tensor names and shapes.
    """
    data = read_adapter_file(path)
    config = AdapterConfig(**data["adapter_config"])
    check_base_model(data, model.config, path, getattr(model, "base_fingerprint", None))
    if getattr(model, "adapter_config", None) not in (None, config):
        raise ValueError(f"{path} holds an adapter with {config}, "
                         f"but the model already has one with {model.adapter_config}")
    if model.lm_head.weight.is_meta:
        raise ValueError("The model is on the meta device: load its base weights before the adapter")
    with torch.device("meta"):  # a shape-only copy (no memory) says which tensors the file must hold
        expected = adapter_state_dict(apply_adapter(LLaMA(model.config), **asdict(config)))
    check_tensors(data["adapter"], {name: t.shape for name, t in expected.items()}, path)
    if getattr(model, "adapter_config", None) is None:
        apply_adapter(model, **asdict(config))
    with torch.no_grad():
        for name, tensor in data["adapter"].items():
            model.get_parameter(name).copy_(tensor)  # into the model's device and dtype
    model.prompt_format = data.get("prompt")  # the format it was finetuned in (lit_lora/chat.py generates in it)
    return model
