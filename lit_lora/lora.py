"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

The idea. Finetuning changes a pretrained weight W0 (d_out x d_in) by some dW. The paper's observation is that
dW has a low "intrinsic rank": it can be written as B A with B (d_out x r) and A (r x d_in) for a small r
(1 to 64) and lose little. So W0 stays frozen, and only A and B train:

    h = W0 x + (alpha / r) * B A x

- Init: A is random (Kaiming-uniform) and B is zero, so B A = 0 and a fresh LoRA model is exactly the
  base model; training starts from the pretrained function, not from noise.
- Scaling: the update is multiplied by alpha / r. The paper sets alpha to the first r it tries and leaves it
  there, and finds that this scaling reduces the need to retune the learning rate when r changes (rsLoRA,
  Kalajdzievski 2023, argues that alpha / sqrt(r) does so better at large r).
- Dropout on the LoRA path's input regularises the small update only; W0 x is untouched.
- Parameters: a d_out x d_in matrix costs r (d_in + d_out) trainable numbers instead of d_in d_out. For
  LLaMA 7B with r = 8 on the query and value projections of its 32 layers: 32 * 2 * 8 * (4096 + 4096) =
  4,194,304 trainable parameters, 0.06% of 6.7B, about 8 MB in bf16.
- Merging: after training, W = W0 + (alpha / r) B A is an ordinary matrix again. Folding it in once makes
  the finetuned model exactly as fast as the base model: LoRA adds no inference latency.

QLoRA, LoRA on a base stored in 4 bits, is lit_lora/quantize.py; saving and loading LoRA files is
lit_lora/method_files.py. This file is the method alone.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from lit_lora.model import ConfigError, LLaMA

# Where each target lives: in every Block (attn.* and mlp.*), or on the model itself (lm_head).
LORA_TARGETS = {
    "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "head": "lm_head",
}


class LoRALinear(nn.Linear):
    """The linear layer it wraps, whose weight W0 stays frozen (the same tensor, under the same name `weight`, so
    base checkpoints load unchanged), plus a trainable low-rank update: h = W0 x + scaling * B(A(dropout(x)))."""

    def __init__(self, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dtype: Optional[torch.dtype] = None):
        if linear.bias is not None:
            raise ValueError("LoRALinear wraps a linear layer without bias (LLaMA has none)")
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would make a new weight: W0 is linear's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # W0, shared with `linear`, not copied
        self.weight.requires_grad = False  # frozen
        self.register_parameter("bias", None)
        device, dtype = self.weight.device, dtype or self.weight.dtype  # A and B beside W0, in its dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its own weight
        nn.init.zeros_(self.lora_B)  # B = 0, so B A = 0: the model starts as the base model
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged, self.disabled = False, False  # disabled: W0 x alone (lora_disabled)
        self.train(linear.training)  # the model's train/eval mode (dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)  # W0 x, the wrapped layer's own product (once merged: W x, with W = W0 + dW)
        if self.merged or self.disabled:
            return h
        # scaling * B(A(dropout(x))): two thin matmuls, never the full d_out x d_in product; the scaling is
        # applied to the r-wide middle, the cheapest place for it
        return h + ((self.lora_dropout(x) @ self.lora_A.T) * self.scaling) @ self.lora_B.T

    def delta_weight(self) -> torch.Tensor:
        """dW = scaling * B A, (d_out, d_in), rank <= r, in fp32: merging rounds W0 + dW to W0's dtype once."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling * B A, for inference at the base model's speed."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A. In 16 bits this gives W0 back only to within rounding: training stays unmerged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def train(self, mode: bool = True) -> "LoRALinear":
        """Training mode unmerges, as loralib's does: merged, A and B are outside the product and get no gradient."""
        if mode and self.merged:
            self.unmerge()
        return super().train(mode)


@dataclass
class LoRAConfig:
    """The hyperparameters of a LoRA: what apply_lora takes and a LoRA file records."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if type(self.r) is not int or self.r < 1:
            raise ConfigError("r", self.r, "the rank must be a whole number, at least 1")
        if type(self.alpha) not in (int, float) or not 0 < self.alpha < math.inf:
            raise ConfigError("alpha", self.alpha, "must be a positive, finite number (the update is scaled by "
                                                   "alpha / r; alpha 0 would switch LoRA off)")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise ConfigError("dropout", self.dropout, "must be at least 0 and below 1")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets) or not self.targets:
            raise ConfigError("targets", self.targets, f"must be a list of targets from {', '.join(LORA_TARGETS)}")
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError("targets", list(self.targets), f"{unknown} are not targets; valid targets are "
                                                             f"{', '.join(LORA_TARGETS)}")


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
        raise ConfigError("targets", list(config.targets), "holds head, but this model's lm_head is its embedding "
                          "matrix (tie_embeddings): merging B A into it would change the embedding too. Leave head out.")
    linears = [(parent, name, getattr(parent, name)) for _, parent, name in target_linears(model, config.targets)]
    smallest = min(min(linear.in_features, linear.out_features) for _, _, linear in linears)
    if r > smallest:  # B A of a d_out x d_in matrix has rank min(d_in, d_out) at most
        raise ConfigError("r", r, f"must be at most {smallest}, the smallest side of the targeted matrices")
    for parent, name, linear in linears:
        # QLoRA: a 4-bit W0 (lit_lora/quantize.py's Linear4bit) names its own LoRA layer, LoRALinear4bit: this class,
        # whose W0 x is the 4-bit product (super().forward) and which refuses to merge into 4 bits
        lora_class = getattr(linear, "lora_class", LoRALinear)
        setattr(parent, name, lora_class(linear, r, alpha, dropout))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is its base, W0 x everywhere, without a copy of a weight: DPO's reference policy
    (lit_lora/dpo.py). Only an unmerged LoRA can be switched off; a merged one is part of W."""
    modules = lora_modules(model)
    if any(module.merged for module in modules):
        raise ValueError("LoRA is merged into W: switch it off unmerged (model.train() unmerges)")
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module in modules:
            module.disabled = False


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (every A and B), keyed as in model.state_dict(): what a LoRA file holds."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def merge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model):
        module.unmerge()
