"""lit-lora LoRA files <-> Hugging Face PEFT LoRA adapters (export_peft_adapter, import_peft_adapter).

A PEFT adapter folder holds:
    adapter_config.json         r, lora_alpha, lora_dropout, target_modules, and the base model's name
    adapter_model.safetensors   the factors (adapter_model.bin in older PEFT versions)

PEFT stores one (lora_A, lora_B) pair per adapted nn.Linear, under the module's name inside
PeftModel -> LlamaForCausalLM: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight. Its lora_A (r, d_in),
lora_B (d_out, r) and scaling lora_alpha / r are ours (lit_lora/lora.py), so the tensors copy as they are; only
their names change, through Hugging Face's names for the base weights (lit_lora/convert/hf.py). An adapter that
computes something else (DoRA, rsLoRA, a rank per layer, ...) is refused, naming the field of adapter_config.json.
"""

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from lit_lora.checkpoint import check_base_model, check_tensors, read_config
from lit_lora.convert.common import check_finite, read_tensors, save_safetensors
from lit_lora.convert.hf import hf_to_lit_name, lit_to_hf_name
from lit_lora.files import atomic_folder, check_links, read_json
from lit_lora.lora import LORA_TARGETS, apply_lora, lora_state_dict
from lit_lora.method_files import read_lora_file, save_lora
from lit_lora.model import ConfigError, LLaMA

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


# ---------------------------------------------------------------------------------------------------------------
# lit -> PEFT
# ---------------------------------------------------------------------------------------------------------------

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
    base_config, lora_config = lora_file["base_config"], lora_file["lora_config"]
    if checkpoint_dir is not None:  # the LoRA must fit the base model it will be loaded onto
        config = read_config(checkpoint_dir / "model_config.json")
        check_base_model(lora_file, config, lora_path, base=str(checkpoint_dir))
        base_config = asdict(config)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft_base_model(base_config, checkpoint_dir, base_model_name_or_path),
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
    with atomic_folder(output_dir) as tmp_dir:
        (tmp_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_safetensors(tensors, tmp_dir / "adapter_model.safetensors")
    print(f"Wrote {output_dir} (adapter_config.json, adapter_model.safetensors: {len(tensors)} tensors); "
          f"base model: {adapter_config['base_model_name_or_path']}")
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# PEFT -> lit
# ---------------------------------------------------------------------------------------------------------------

def read_peft_adapter(peft_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors (adapter_model.safetensors, or .bin from older PEFT)."""
    if not (peft_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No adapter_config.json in {peft_dir}: is it a PEFT adapter folder?")
    check_links(peft_dir)
    hint = "save the adapter again with PEFT (save_pretrained), or download it again"
    adapter_config = read_json(peft_dir / "adapter_config.json", hint)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (peft_dir / name).is_file():
            tensors = dict(read_tensors(peft_dir / name, hint))
            check_finite(tensors, peft_dir / name, hint)
            return adapter_config, tensors
    raise FileNotFoundError(f"No adapter_model.safetensors or adapter_model.bin in {peft_dir}")


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
    target_of_module = {module: target for target, module in PEFT_TARGET_MODULES.items()}
    if not isinstance(modules, list) or any(module not in target_of_module for module in modules):
        raise ValueError(f"{source}: target_modules = {json.dumps(modules)} is not supported: give a list of "
                         f"{', '.join(target_of_module)}")

    config = read_config(checkpoint_dir / "model_config.json")
    with torch.device("meta"):  # shapes only: the base weights are not needed
        model = LLaMA(config)
    try:
        apply_lora(model, r=adapter_config.get("r"), alpha=adapter_config.get("lora_alpha"),
                   dropout=adapter_config.get("lora_dropout", 0.0),
                   targets=tuple(target for target in LORA_TARGETS if PEFT_TARGET_MODULES[target] in modules))  # ours
    except ConfigError as error:  # named as adapter_config.json names it
        field = {"alpha": "lora_alpha", "dropout": "lora_dropout"}.get(error.field, error.field)
        raise ValueError(f"{source}: {field} is {error.value!r}: {error.requirement}") from None
    # The adapter's tensors, checked under their PEFT names (those the user can look up in the file) against the
    # factors this LoRA needs on this base model; copies of base weights are left out.
    lit_name_of_key = {key: peft_to_lit_key(key) for key in peft_tensors}  # None for a copy of a base weight
    lora_tensors = {key: tensor for key, tensor in peft_tensors.items() if lit_name_of_key[key] is not None}
    expected_shapes = {lit_to_peft_key(name): tensor.shape for name, tensor in lora_state_dict(model).items()}
    check_tensors(lora_tensors, expected_shapes, peft_dir,
                  hint=f"The adapter must be a LoRA of the base model in {checkpoint_dir} (another base model "
                       f"gives other shapes) with target_modules {modules}.")
    model.load_state_dict({lit_name_of_key[key]: tensor for key, tensor in lora_tensors.items()},
                          strict=False, assign=True)  # the LoRA factors become real tensors
    save_lora(model, output_path)
    print(f"Wrote {output_path} (r={adapter_config['r']}, alpha={adapter_config['lora_alpha']}, "
          f"targets {model.lora_config.targets})")
    return output_path
