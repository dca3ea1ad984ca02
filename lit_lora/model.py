"""The LLaMA architecture in one file: read it top to bottom.

LLaMA (Touvron et al., 2023) is a decoder-only transformer with three changes to GPT-2:
pre-normalisation with RMSNorm, the SwiGLU feed-forward network, and rotary position embeddings
(RoPE) instead of learned absolute positions. Llama 2 adds grouped-query attention (several query
heads share one key/value head) to its 70B model.

Names are Hugging Face's (`LlamaForCausalLM`: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`), so a LoRA target reads the same here as in PEFT; the paper calls the projections W_q, W_k, W_v, W_o.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048  # the longest sequence the model is trained on (its context)
    vocab_size: int = 32000  # tokens the tokenizer knows
    padding_multiple: int = 64  # the embedding table is padded to a multiple of this, for fast matmuls
    padded_vocab_size: Optional[int] = None  # derived from the two above unless given
    n_layer: int = 32
    n_head: int = 32  # query heads
    n_query_groups: Optional[int] = None  # key/value heads: n_head = MHA, 1 = MQA, in between = GQA
    n_embd: int = 4096
    intermediate_size: Optional[int] = None  # SwiGLU hidden size; derived from n_embd unless given
    norm_eps: float = 1e-5
    rope_base: float = 10000  # RoPE's theta: the longest wavelength grows with it (Llama 3: 500000)
    rope_scaling: Optional[dict] = None  # Llama 3.1+: factor, low_freq_factor, high_freq_factor, original_context
    tie_embeddings: bool = False  # lm_head is the embedding matrix (Llama 3.2 1B/3B, SmolLM2)
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the Hugging Face repo it came from)

    def __post_init__(self):  # the sizes left out are derived (checkpoint.py checks every field read from a file)
        if self.padded_vocab_size is None:
            self.padded_vocab_size = math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:  # the paper's SwiGLU size: 2/3 of 4 n_embd, up to a multiple of 256
            self.intermediate_size = math.ceil(int(2 * 4 * self.n_embd / 3) / 256) * 256  # 11008 for 7B

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"Unknown model name {name!r}. Known presets: {', '.join(PRESETS)}")
        return cls(**{"name": name, **PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm: no mean subtraction, no bias."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the mean of squares in fp32: bf16 would lose the small values
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_rope_cache(seq_len: int, head_size: int, base: float = 10000, device=None,
                     scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle m * theta_i for position m and frequency theta_i = base^(-2i/d): two (seq_len,
    head_size) tensors, in fp32; each frequency appears twice, once per half of the head."""
    theta = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device).float() / head_size))  # (hs/2,)
    if scaling is not None:
        theta = llama3_scaled_frequencies(theta, **scaling)
    positions = torch.arange(seq_len, device=device).float()
    angles = torch.outer(positions, theta)  # (seq_len, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (seq_len, hs)
    return torch.cos(angles), torch.sin(angles)


def llama3_scaled_frequencies(theta: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                              original_context: int) -> torch.Tensor:
    """Llama 3.1's longer context: a frequency whose wavelength 2 pi / theta is longer than original_context /
    low_freq_factor is slowed down by `factor`; one shorter than original_context / high_freq_factor is kept;
    in between the two are blended: theta' = (1 - s) theta / factor + s theta, with
    s = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    wavelength = 2 * math.pi / theta
    s = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - s) * theta / factor + s * theta
    kept = torch.where(wavelength < original_context / high_freq_factor, theta, blended)
    return torch.where(wavelength > original_context / low_freq_factor, theta / factor, kept)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + d/2}) of a query or key by the angle of its position.

    A rotation keeps the vector's norm, and q_m . k_n then depends only on m - n: attention sees
    relative positions. This is the "rotate half" layout of Hugging Face's weights; Meta's original
    weights pair neighbours (x_2i, x_2i+1) instead, which checkpoints/convert_meta.py permutes.

    Precision, as in Hugging Face's: cos and sin are computed in fp32 and rounded to x's dtype here, whether the
    model kept them in fp32 or cast them with its weights (model.to(bf16)): the same numbers either way.
    """
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (-x2, x1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        kv_size = config.n_query_groups * config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_size, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_size, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                input_pos: Optional[torch.Tensor] = None, lengths: Optional[list[int]] = None) -> torch.Tensor:
        B, T, C = x.shape  # (batch, sequence, n_embd)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, n_head, T, hs)
        k = self.k_proj(x).view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)  # (B, n_groups, T, hs)
        v = self.v_proj(x).view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:  # decoding: keys and values of the earlier positions come from the cache
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_groups, max_seq_length, hs)
        y = self.attend(q, k, v, mask, lengths)  # (B, n_head, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               lengths: Optional[list[int]] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + causal mask) v, with each key/value head shared by a group of query heads."""
        k, v = repeat_kv(k, self.n_head), repeat_kv(v, self.n_head)  # (B, n_head, S, hs)
        if lengths is not None:  # a packed row (LLaMA.forward): each example attends within itself, never across
            parts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
            return torch.cat([F.scaled_dot_product_attention(*part, is_causal=True) for part in parts], dim=2)
        if mask is None:  # a whole sequence at once (training): the fused causal kernel
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Grouped-query attention: each of the n_query_groups key/value heads serves n_head / n_query_groups query
    heads, so it is repeated that many times. (B, n_query_groups, S, hs) -> (B, n_head, S, hs)."""
    return x.repeat_interleave(n_head // x.size(1), dim=1) if x.size(1) != n_head else x


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None, lengths=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, lengths)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix maps ids to vectors (embed) and vectors to scores (lm_head)
            self.lm_head.weight = self.embed.weight
        on_meta = self.norm.weight.is_meta  # built for its shapes (load_model): cos/sin computed on the CPU instead
        cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base, "cpu" if on_meta else None,
                                    config.rope_scaling)
        self.register_buffer("cos", cos, persistent=False)  # not in checkpoints: derived from the config
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """For training from scratch: weights ~ N(0, 0.02), and the two projections that write into the residual
        stream (o_proj, down_proj) scaled by 1/sqrt(2 n_layer), as in GPT-2, so its variance stays flat with depth."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if any(module is block.attn.o_proj or module is block.mlp.down_proj for block in self.blocks):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

    def reset_rope_cache(self) -> None:
        """Recompute cos/sin (e.g. after the model was built on the meta device and loaded with assign=True)."""
        config, device = self.config, self.lm_head.weight.device
        self.cos, self.sin = build_rope_cache(config.block_size, config.head_size, config.rope_base, device,
                                              config.rope_scaling)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None, lengths: Optional[list[int]] = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, padded_vocab_size), the scores of every possible next token.

        Training (and any plain forward) reads the T tokens as positions 0..T-1, each attending to those before it.
        A packed row (B = 1, `lengths` given) holds several examples one after another, as many tokens as they have
        and no padding: each is read as if alone, its positions restarting at 0 and its attention kept inside it.
        With logits_at ((B, T) bool), only the logits where it is True are computed, returned as (N, vocab): the
        vocabulary projection is the largest matmul of a small model, and training needs it only where there is a
        label, not on the masked prompt. Decoding passes input_pos (see "Decoding with a KV cache" below)."""
        B, T = idx.shape
        if input_pos is None:
            if max(lengths or [T]) > self.config.block_size:
                raise ValueError(f"Cannot forward a sequence of {max(lengths or [T])} tokens: the context is "
                                 f"{self.config.block_size}")
            cos, sin, mask = self.cos[:T], self.sin[:T], None  # (T, hs); no mask: causal attention in the kernel
            if lengths is not None:  # packed: positions 0..n-1 of each example
                positions = torch.cat([torch.arange(n, device=idx.device) for n in lengths])  # (T,)
                cos, sin = self.cos[positions], self.sin[positions]
        else:
            cos, sin, mask = self.decoding_positions(input_pos, B, T)
        x = self.embed(idx)  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x, cos, sin, mask, input_pos, lengths)
        x = self.norm(x)
        if logits_at is not None:
            x = x[logits_at]  # (N, n_embd): only the positions whose logits are wanted
        return self.lm_head(x)  # (B, T, padded_vocab_size), or (N, padded_vocab_size)

    # Decoding with a KV cache. Token t+1 needs the keys and values of positions 0..t in every layer; the cache
    # keeps them, so a decoding step feeds only the new token. Each row of a batch has its own positions ((B, T)
    # input_pos): right-padded prompts of different lengths decode exactly as each would alone.

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None) -> None:
        """Preallocate keys/values for `max_seq_length` positions (at most block_size) in every layer."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} is longer than the context ({self.config.block_size})")
        config, weight = self.config, self.lm_head.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, config.n_query_groups, max_seq_length, config.head_size,
                                          device or weight.device, dtype or weight.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def decoding_positions(self, input_pos: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, ...]:
        """cos, sin and the attention mask for tokens at input_pos ((T,) shared by all rows, or (B, T)): each
        query sees every cached position up to its own, and none of the cache not written yet."""
        kv_cache = self.blocks[0].attn.kv_cache
        if kv_cache is None:
            raise RuntimeError("input_pos needs a KV cache: call model.set_kv_cache(batch_size, max_seq_length)")
        input_pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        cos, sin = self.cos[input_pos].unsqueeze(1), self.sin[input_pos].unsqueeze(1)  # (B, 1, T, hs)
        cache_pos = torch.arange(kv_cache.k.size(2), device=input_pos.device)  # (max_seq_length,)
        allowed = cache_pos <= input_pos.unsqueeze(-1)  # (B, T, max_seq_length): key position <= query position
        # Added to the scores: -inf gives a key no weight. Built once per step, in the cache's dtype, not per layer.
        mask = torch.zeros(allowed.shape, dtype=kv_cache.k.dtype, device=input_pos.device)
        return cos, sin, mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)  # mask: (B, 1, T, max_seq_length)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, in one layer (buffers: they move with the model)."""

    def __init__(self, batch_size: int, n_query_groups: int, max_seq_length: int, head_size: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_query_groups, T, hs) at input_pos, (T,) or (1, T) for the same positions in every row,
        (B, T) for each row its own; return the whole cache (the mask hides what is not written yet)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if input_pos.dim() == 1 or input_pos.size(0) == 1:
            self.k.index_copy_(2, input_pos.reshape(-1), k)
            self.v.index_copy_(2, input_pos.reshape(-1), v)
        else:
            rows = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


ROPE_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_context")
LLAMA_3 = dict(vocab_size=128256, n_query_groups=8, rope_base=500000, block_size=131072)
LLAMA_3_1_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)
SMOLLM2 = dict(vocab_size=49152, block_size=8192, rope_base=100000, tie_embeddings=True)

# Published shapes, from the papers (LLaMA, Llama 2) and the models' config.json (the others).
PRESETS = {
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, norm_eps=1e-6),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120, norm_eps=1e-6),
    "30B": dict(n_layer=60, n_head=52, n_embd=6656, norm_eps=1e-6),
    "65B": dict(n_layer=80, n_head=64, n_embd=8192, norm_eps=1e-6),
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120),
    "Llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672),
    "TinyLlama-1.1B": dict(n_layer=22, n_head=32, n_query_groups=4, n_embd=2048, intermediate_size=5632),
    "open_llama_3b": dict(n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640, norm_eps=1e-6),
    "open_llama_7b": dict(n_layer=32, n_head=32, n_embd=4096, norm_eps=1e-6),
    "Llama-3.2-1B": dict(LLAMA_3, n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192, tie_embeddings=True,
                         rope_scaling=dict(LLAMA_3_1_ROPE, factor=32.0)),
    "Llama-3.2-3B": dict(LLAMA_3, n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192, tie_embeddings=True,
                         rope_scaling=dict(LLAMA_3_1_ROPE, factor=32.0)),
    "Llama-3.1-8B": dict(LLAMA_3, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336, rope_scaling=LLAMA_3_1_ROPE),
    "Llama-3.1-70B": dict(LLAMA_3, n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672,
                          rope_scaling=LLAMA_3_1_ROPE),
    "SmolLM2-135M": dict(SMOLLM2, n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536),
    "SmolLM2-360M": dict(SMOLLM2, n_layer=32, n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560),
    "SmolLM2-1.7B": dict(SMOLLM2, n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192, rope_base=130000),
    # Not published models: small shapes for CPU runs. `tiny` (0.9M parameters) is what the CPU demo pretrains;
    # `micro` is the smallest useful model, with grouped-query attention, for fast tests.
    "tiny": dict(block_size=256, vocab_size=512, n_layer=4, n_head=4, n_embd=128, intermediate_size=352),
    "micro": dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64),
}


class ConfigError(ValueError):
    """A value a config cannot hold, naming its field, so that a caller can say where it came from (a file, a flag)."""

    def __init__(self, field: str, value, requirement: str):
        super().__init__(f"{field}={value!r}: {requirement}")
        self.field, self.value, self.requirement = field, value, requirement
