"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

The idea. Finetuning changes a pretrained weight W0 (d_out x d_in) by some dW. The paper's observation is that
dW has a low "intrinsic rank": it can be written as B A with B (d_out x r) and A (r x d_in) for a small r
(1 to 64) and lose little. So W0 stays frozen, and only A and B train:

    h = W0 x + (alpha / r) * B A x

- Init: A is random (Kaiming-uniform) and B is zero, so B A = 0 and a fresh LoRA model is exactly the
  base model; training starts from the pretrained function, not from noise.
- Scaling: the update is multiplied by alpha / r. With Adam, the size of B A's change scales with r, so
  dividing by r lets you change r without retuning the learning rate (the paper sets alpha to the first r
  it tries and leaves it there).
- Dropout on the LoRA path's input regularises the small update only; W0 x is untouched.
- Parameters: a d_out x d_in matrix costs r (d_in + d_out) trainable numbers instead of d_in d_out. For
  LLaMA 7B with r = 8 on the query and value projections of its 32 layers: 32 * 2 * 8 * (4096 + 4096) =
  4,194,304 trainable parameters, 0.06% of 6.7B, about 8 MB in bf16.
- Merging: after training, W = W0 + (alpha / r) B A is an ordinary matrix again. Folding it in once makes
  the finetuned model exactly as fast as the base model: LoRA adds no inference latency.
- QLoRA: W0 may be stored in 4 bits (lit_lora/quantize.py); the layer computes the same h, with W0
  dequantized inside its matmul. Such a W0 cannot take the merge: W0 + dW would have to be rounded to 4 bits
  again, which would lose most of dW, so LoRA stays unmerged on a 4-bit base.
"""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from lit_lora.model import LLaMA
from lit_lora.quantize import compute_dtype, is_4bit, linear_4bit
from lit_lora.utils import atomic_save, check_base_model, check_tensors

# Where each target lives: in every Block (attn.* and mlp.*), or on the model itself (lm_head).
LORA_TARGETS = {
    "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "head": "lm_head",
}


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (`weight` is W0, same name so base checkpoints load unchanged) plus a trainable
    low-rank update: h = W0 x + scaling * B(A(dropout(x)))."""

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.weight.requires_grad = False  # W0 is frozen
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))  # (d_out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        nn.init.zeros_(self.lora_B)  # B = 0, so B A = 0: the model starts as the base model

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float) -> "LoRALinear":
        """Wrap an existing linear layer, sharing its weight tensor (no copy; works on the meta device). A 4-bit
        layer (lit_lora/quantize.py's Linear4bit) is wrapped the same way: its 4-bit weight becomes W0."""
        if linear.bias is not None:
            raise ValueError("LoRALinear expects a linear layer without bias (LLaMA has none)")
        w = linear.weight
        lora = cls(linear.in_features, linear.out_features, r, alpha, dropout, device="meta")  # allocates nothing
        if is_4bit(w):
            lora.weight = w  # the same 4-bit W0, with its quantization state; frozen
        else:
            lora.weight = nn.Parameter(w.data, requires_grad=False)  # the same W0 storage
        dtype = compute_dtype(w)  # A and B in W0's dtype (for a 4-bit W0: the dtype it was quantized from)
        lora.lora_A = nn.Parameter(torch.empty_like(lora.lora_A, device=w.device, dtype=dtype))
        lora.lora_B = nn.Parameter(torch.empty_like(lora.lora_B, device=w.device, dtype=dtype))
        lora.reset_lora_parameters()
        return lora.train(linear.training)  # keep the model's train/eval mode (dropout)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in), rank <= r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W0 x (already W0 + dW when merged); QLoRA: W0 is 4-bit, dequantized inside the matmul
        h = linear_4bit(x, self.weight) if is_4bit(self.weight) else super().forward(x)
        if self.merged:
            return h
        # scaling * B(A(dropout(x))): two thin matmuls, never the full d_out x d_in product; the scaling is
        # applied to the r-wide middle, the cheapest place for it
        return h + ((self.lora_dropout(x) @ self.lora_A.T) * self.scaling) @ self.lora_B.T

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling * B A, for inference at the base model's speed. Training stays unmerged:
        merging and unmerging again and again in low precision would slowly drift the frozen W0."""
        if is_4bit(self.weight):
            raise ValueError("Cannot merge LoRA into a 4-bit W0 (QLoRA): W0 + dW rounded to 4 bits again would lose "
                             "most of dW. Keep LoRA unmerged (generate/lora.py --quantize does), or load the "
                             "unquantized base to merge.")
        if not self.merged:
            self.weight.data += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.data -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


@dataclass
class LoRAConfig:
    """The hyperparameters a LoRA file carries, so loading it needs no repeated flags."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"Unknown LoRA target(s) {unknown}: valid targets are {', '.join(LORA_TARGETS)} "
                             f"(e.g. --lora_targets [q,v])")
        if not self.targets:
            raise ValueError(f"No LoRA targets given: choose from {', '.join(LORA_TARGETS)}")
        if self.r < 1:
            raise ValueError(f"--lora_r {self.r}: the LoRA rank r must be at least 1")
        if self.alpha <= 0:
            raise ValueError(f"--lora_alpha {self.alpha}: must be positive (the update is scaled by alpha / r; "
                             "alpha 0 would switch LoRA off)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora_dropout {self.dropout}: must be in [0, 1)")


def target_linears(model: LLaMA, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str]]:
    """(state-dict prefix, parent module, attribute name) of every linear the targets name."""
    for target in targets:
        parent_path, _, name = LORA_TARGETS[target].rpartition(".")
        if target == "head":
            yield name, model, name
        else:
            for i, block in enumerate(model.blocks):
                yield f"blocks.{i}.{parent_path}.{name}", block.get_submodule(parent_path), name


def apply_lora(model: LLaMA, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               targets: tuple[str, ...] = ("q", "v")) -> LLaMA:
    """Replace the target linears of every block (and lm_head for "head") by LoRALinear, in place."""
    if hasattr(model, "lora_config"):
        raise ValueError(f"This model already has LoRA ({model.lora_config}); apply it once")
    config = LoRAConfig(r, alpha, dropout, targets)
    if "head" in config.targets and model.config.tie_embeddings:
        raise ValueError("--lora_targets includes head, but this model's lm_head is its embedding matrix "
                         "(tie_embeddings): merging B A into it would change the embedding too. Leave head out.")
    for _, parent, name in target_linears(model, config.targets):
        setattr(parent, name, LoRALinear.from_linear(getattr(parent, name), r, alpha, dropout))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def merge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.unmerge()


def save_lora(model: LLaMA, path: Union[str, Path], state_dict: Optional[dict] = None) -> None:
    """One self-describing file: the LoRA tensors, their hyperparameters, the base model's config and, for
    QLoRA, the 4-bit format of the base it was trained on (the file loads on the unquantized base too).

    The tensors come from the model, or from `state_dict` (the training loop passes the ones it gathered
    from all devices)."""
    tensors = lora_state_dict(model) if state_dict is None else state_dict
    atomic_save({
        "lora": {name: tensor.detach().cpu() for name, tensor in tensors.items() if "lora_" in name},
        "lora_config": asdict(model.lora_config),
        "base_config": asdict(model.config),
        "base_fingerprint": getattr(model, "base_fingerprint", None),  # which base weights it was trained on
        "quantization": getattr(model, "quantization", None),  # None, or the base's 4-bit format (QLoRA)
    }, path)


def read_lora_file(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA file at {path}: finetune/lora.py writes <out_dir>/lit_lora_finetuned.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"lora", "lora_config", "base_config"} <= set(checkpoint):
        raise ValueError(f"{path} is not a LoRA file written by lit-lora (it lacks lora, lora_config, base_config)")
    return checkpoint


def load_lora(model: LLaMA, path: Union[str, Path]) -> LLaMA:
    """Add LoRA to `model` with the file's hyperparameters and load its tensors; every mismatch is an error."""
    checkpoint = read_lora_file(path)
    check_base_model(checkpoint, model.config, path, getattr(model, "base_fingerprint", None))
    config = LoRAConfig(**{f.name: checkpoint["lora_config"][f.name] for f in fields(LoRAConfig)})
    if hasattr(model, "lora_config") and model.lora_config != config:
        raise ValueError(f"{path} holds LoRA {config}, but the model already has {model.lora_config}")
    if any(module.merged for module in lora_modules(model)):
        raise ValueError(f"Cannot load {path} into a model whose LoRA is merged: W holds W0 + the old update. "
                         "Call unmerge_lora(model) first (then load, then merge_lora(model) again).")
    # Check every tensor before touching the model: a failed load leaves it as it was.
    expected = {}
    for prefix, parent, name in target_linears(model, config.targets):
        linear = getattr(parent, name)
        expected[f"{prefix}.lora_A"] = (config.r, linear.in_features)
        expected[f"{prefix}.lora_B"] = (linear.out_features, config.r)
    check_tensors(checkpoint["lora"], expected, path, "Was it trained with other LoRA targets or another model?")
    if not hasattr(model, "lora_config"):
        apply_lora(model, config.r, config.alpha, config.dropout, config.targets)
    model.load_state_dict(checkpoint["lora"], strict=False)
    return model
