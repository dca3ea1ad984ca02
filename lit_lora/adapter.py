"""LLaMA-Adapter (Zhang et al., 2023, arXiv 2303.16199): finetune 1.2M parameters of a frozen 7B model.

The idea. Each of the top layers gets a learnable *adaption prompt* P_l: K vectors of size C (the
model width), like K extra tokens that exist only inside that layer. The layer's frozen key/value
projections turn them into K keys and values, and every query of the sequence also attends to them:

    S_prompt = softmax(Q (P_l W_k)^T / sqrt(hs))          (T, K): every query sees all K prompt tokens
    out      = attention(Q, K_seq, V_seq) + g_l * S_prompt (P_l W_v)

The prompt has no position, so its keys get no RoPE and need no causal mask, and its softmax is
taken over the K prompt tokens alone: the model's own attention over the sequence is left as it was.

Zero-init attention. The gating factor g_l (one per head) starts at 0, so at step 0 the adapted model
*is* the base model, to the last bit. The randomly initialised prompts therefore cannot inject noise
into the pretrained model at the start of finetuning; gradient descent opens each gate as far as the
prompt proves useful. (While g_l = 0 the prompt receives no gradient; the gate does, because its
gradient is <dL/d out, S_prompt P_l W_v>, so the prompt starts learning from the second step on.)

Why only the top layers. The lower layers compute general features of the text; the instruction-
following cues are high-level semantics, which the paper finds best injected into the topmost
L layers (L = 30 of 32 for 7B, i.e. `start_layer=2`).

Parameter count: L * (K * C + n_head). For 7B with K = 10: 30 * (10 * 4096 + 32) = 1,229,760.

Caching. The prompt's keys and values depend only on the weights, not on the input. During training
they are recomputed every forward (the prompt changes every step). When the model has a KV cache
(generation), they are computed on first use and kept on that layer's `KVCache` object as
`kv_cache.adapter_kv`, so they live exactly as long as the cache: `model.set_kv_cache(...)` (new
caches) or `model.clear_kv_cache()` drops them. Change the adapter's weights only between
generations, i.e. with no KV cache set; the KV cache is for inference (`torch.no_grad()`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.model import CausalSelfAttention, ConfigError, LLaMA, repeat_kv

ADAPTER_PARAMETERS = ("adaption_prompt", "gating_factor")  # the names of the tensors LLaMA-Adapter adds


@dataclass
class AdapterConfig:
    """The hyperparameters of an adapter: what apply_adapter takes and an adapter file records."""

    prompt_length: int = 10  # K: prompt vectors per adapted layer
    start_layer: int = 2  # layers start_layer.. get a prompt (the paper: the top 30 of 32)

    def __post_init__(self):
        if type(self.prompt_length) is not int or self.prompt_length < 1:
            raise ConfigError("prompt_length", self.prompt_length, "the prompt needs a whole number of vectors, at least 1")
        if type(self.start_layer) is not int or self.start_layer < 0:
            raise ConfigError("start_layer", self.start_layer, "must be a whole number, not negative (layers count from 0)")


class AdapterAttention(CausalSelfAttention):
    """A CausalSelfAttention that also attends to a learnable prompt, through a gate that starts at zero.

    Built from an existing attention module, sharing its (frozen) q/k/v/o projections: no copies.
    """

    def __init__(self, attention: CausalSelfAttention, prompt_length: int, dtype: torch.dtype):
        nn.Module.__init__(self)  # not CausalSelfAttention.__init__: that would build new q/k/v/o weights
        self.n_head, self.n_query_groups = attention.n_head, attention.n_query_groups
        self.head_size = attention.head_size
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj  # shared, not copied
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.kv_cache = attention.kv_cache
        device, n_embd = self.q_proj.weight.device, self.q_proj.in_features  # where the model is (meta included)
        # N(0, 1), the scale of the normalised hidden states that k_proj and v_proj usually see.
        # Not zero: with both the prompt and the gate at zero neither would ever get a gradient.
        self.adaption_prompt = nn.Parameter(torch.randn(prompt_length, n_embd, device=device, dtype=dtype))
        self.gating_factor = nn.Parameter(torch.zeros(1, self.n_head, 1, 1, device=device, dtype=dtype))

    def compute_prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P W_k and P W_v, split into heads: (1, n_query_groups, prompt_length, hs) each. No RoPE: no position."""
        K = self.adaption_prompt.size(0)
        k = self.k_proj(self.adaption_prompt).view(1, K, self.n_query_groups, self.head_size).transpose(1, 2)
        v = self.v_proj(self.adaption_prompt).view(1, K, self.n_query_groups, self.head_size).transpose(1, 2)
        return k, v

    def prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recomputed every call when training; computed once per KV cache when generating (module docstring)."""
        if self.kv_cache is None:
            return self.compute_prompt_kv()
        if getattr(self.kv_cache, "adapter_kv", None) is None:
            self.kv_cache.adapter_kv = self.compute_prompt_kv()
        return self.kv_cache.adapter_kv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               lengths: Optional[list[int]] = None) -> torch.Tensor:
        y = super().attend(q, k, v, mask, lengths)  # (B, n_head, T, hs): the base model's attention, unchanged
        prompt_k, prompt_v = self.prompt_kv()  # (1, n_query_groups, K, hs)
        prompt_k, prompt_v = repeat_kv(prompt_k, self.n_head), repeat_kv(prompt_v, self.n_head)  # (1, n_head, K, hs)
        B = q.size(0)
        # softmax(q prompt_k^T / sqrt(hs)) prompt_v, no mask: every query sees the whole prompt
        prompt_y = F.scaled_dot_product_attention(q, prompt_k.expand(B, -1, -1, -1), prompt_v.expand(B, -1, -1, -1))
        return y + self.gating_factor.to(y.dtype) * prompt_y  # (1, n_head, 1, 1) gates each head


def apply_adapter(model: LLaMA, prompt_length: int = 10, start_layer: int = 2) -> LLaMA:
    """Swap the attention of blocks start_layer.. for AdapterAttention, in place. A fresh one changes nothing."""
    config = AdapterConfig(prompt_length, start_layer)
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError(f"The model already has an adapter ({model.adapter_config}); apply it once")
    if start_layer >= model.config.n_layer:
        raise ConfigError("start_layer", start_layer, f"must be below the model's n_layer ({model.config.n_layer})")
    dtype = model.embed.weight.dtype  # the model's dtype (the embedding's: never stored in 4 bits)
    for block in model.blocks[start_layer:]:
        block.attn = AdapterAttention(block.attn, prompt_length, dtype)
    model.adapter_config = config
    return model


def is_adapter_parameter(name: str) -> bool:
    return name.split(".")[-1] in ADAPTER_PARAMETERS


def mark_only_adapter_as_trainable(model: LLaMA) -> None:
    """requires_grad=True for the prompts and gates, False for every weight of the base model."""
    if getattr(model, "adapter_config", None) is None:
        raise ValueError("The model has no adapter to train: call apply_adapter(model) first")
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_parameter(name)


def adapter_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (prompts and gates), keyed as in model.state_dict()."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter_parameter(name)}
