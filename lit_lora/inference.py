"""A faster layout of the same model for decoding: fused weights, stored as each way of running multiplies them
fastest. Inference only.

At batch size 1 a decoding step multiplies every weight matrix by one vector, so its speed is the speed of
reading the weights from memory. Three things make that reading faster without changing what is computed:

- Fusing. q, k and v read the same input, and so do gate and up: stacking their weights into one matrix turns
  three matrix-vector products into one (and two into one). Fewer, larger products: less time launching kernels
  and more time streaming weights.
- Eager decoding: transposing. nn.Linear stores W as (d_out, d_in) and computes x W^T. torch's CPU matrix-vector
  product reads a weight stored (d_in, d_out) and computed as x @ W faster on the CPUs this was measured on, most
  for a wide matrix such as a small model's lm_head.
- Compiled decoding (compile_decoding, at the end): W kept (d_out, d_in) and the product of one row written as a
  sum of elementwise products, y_j = sum_i x_i W_ji, which torch.compile turns into one loop that streams W once.
  No matrix-multiply library call is involved: torch.compile writes the loop, vectorized for the CPU it runs on.

RoPE and RMSNorm take fewer operations as well (below). What all this gains, measured against Hugging Face, against
llama.cpp and against the memory-bandwidth bound, is printed by benchmarks/generate_throughput.py and
benchmarks/real_model_decode.py (howto/generate.md, "Speed"). Training never uses this layout (LoRA and the adapter
need the modules of model.py), so it is applied only where a model is prepared for generation, after LoRA is
merged (a merged LoRA layer is a plain x W^T again).
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.lora import LoRALinear
from lit_lora.model import MLP, CausalSelfAttention, LLaMA, RMSNorm


class Projection(nn.Module):
    """y = x W^T for one weight W (d_out, d_in), or several stacked (q, k, v), stored for the way it will run:
    transposed, (d_in, d_out), for eager decoding; as it is for compiled decoding (see the module's docstring)."""

    def __init__(self, weight: torch.Tensor, transposed: bool):
        super().__init__()
        self.transposed = transposed
        # not transposed: the tensor itself, shared (a tied lm_head stays the embedding's matrix, no copy)
        self.stored = nn.Parameter(weight.t().contiguous() if transposed else weight, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # W (d_out, d_in), a view: where code asks a layer for its device and dtype
        return self.stored.t() if self.transposed else self.stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return x @ self.stored
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1 and x.device.type == "cpu":
            return matvec(x, self.stored)  # one row, inside torch.compile, on a CPU (a GPU's own product is good)
        return F.linear(x, self.stored)  # several rows (a prefill, a batch), or eager: the library's product


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for one row x (..., d_in), as elementwise products and sums that torch.compile fuses into one loop over
    W (d_out, d_in). The sum over d_in runs in 16 lanes (columns 16 apart; one AVX-512 register of fp32), added up
    only at the end of each row: 16 independent running sums stream W faster than one. Never run this eagerly: it
    would write out x * W, a matrix the size of W."""
    d_out, d_in = weight.shape
    lanes = 16 if d_in % 16 == 0 else 1
    partial = (x.reshape(d_in // lanes, lanes) * weight.view(d_out, d_in // lanes, lanes)).sum(1)  # (d_out, lanes)
    return partial.sum(-1).view(*x.shape[:-1], d_out)


class FusedAttention(CausalSelfAttention):
    """CausalSelfAttention with q, k and v as one (n_embd + 2 kv_size, n_embd) projection."""

    def __init__(self, attention: CausalSelfAttention, transposed: bool = True):
        nn.Module.__init__(self)  # not CausalSelfAttention.__init__: the weights come from `attention`
        self.n_head, self.n_query_groups, self.head_size = attention.n_head, attention.n_query_groups, attention.head_size
        self.kv_cache = attention.kv_cache
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv = Projection(torch.cat([proj.weight for proj in projections]), transposed)
        self.o = Projection(attention.o_proj.weight, transposed)  # (n_embd, n_embd)
        half = self.head_size // 2  # RoPE's sin with the sign of rotate-half folded in: (-1,..., -1, 1,..., 1)
        weight = attention.o_proj.weight
        self.register_buffer("rope_sign", torch.tensor([-1.0] * half + [1.0] * half, dtype=weight.dtype,
                                                       device=weight.device), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, input_pos=None,
                lengths=None) -> torch.Tensor:
        B, T, C = x.shape
        n_qk = self.n_head + self.n_query_groups  # query heads, then key heads, then value heads
        qkv = self.qkv(x).view(B, T, n_qk + self.n_query_groups, self.head_size)  # one product instead of three
        qk = rope_rolled(qkv[:, :, :n_qk], cos, sin, self.rope_sign).transpose(1, 2)  # q and k rotated at once
        q, k = qk.split([self.n_head, self.n_query_groups], dim=1)  # (B, n_head, T, hs), (B, n_groups, T, hs)
        v = qkv[:, :, n_qk:].transpose(1, 2)  # (B, n_groups, T, hs)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = self.attend(q, k, v, mask, lengths).transpose(1, 2).reshape(B, T, C)
        return self.o(y)


def rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """model.py's apply_rope in fewer operations, on heads laid out (B, T, heads, hs): x cos + (-x2, x1) sin is
    x cos + (x2, x1) (-sin, sin), and (x2, x1) is x rolled by half a head. The same products, the same numbers."""
    cos, sin = (cos.transpose(1, 2), sin.transpose(1, 2)) if cos.dim() == 4 else (cos.unsqueeze(1), sin.unsqueeze(1))
    cos, sin = cos.to(x.dtype), sin.to(x.dtype) * sign.to(x.dtype)  # as apply_rope: in x's dtype
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin  # cos, sin: (B or 1, T, 1, hs)


class FusedRMSNorm(RMSNorm):
    """RMSNorm with x / sqrt(mean(x^2) + eps) in one call (F.rms_norm, the same numbers): 2 calls, not 7."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the weight inside the call too: the same bits in fp32
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class FusedMLP(MLP):
    """SwiGLU with gate and up as one (2 intermediate, n_embd) projection."""

    def __init__(self, mlp: MLP, transposed: bool = True):
        nn.Module.__init__(self)
        self.gate_up = Projection(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), transposed)
        self.down = Projection(mlp.down_proj.weight, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # one product instead of two
        return self.down(F.silu(gate) * up)


@torch.no_grad()
def fuse_for_inference(model: LLaMA, for_compile: bool = False) -> LLaMA:
    """Swap the norms, attention, MLP and lm_head of `model` for their fused forms, in place; the model then computes
    the same function (the same tokens when decoding greedily), faster. Weights are stored transposed for eager
    decoding, or as they are when the decoding step will be compiled (`for_compile`, then compile_decoding).
    Modules that are not model.py's own (an adapter's attention, an unmerged LoRA layer, a 4-bit layer) are left as
    they are: they still work, unfused."""
    transposed = not for_compile
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        block.attn_norm, block.mlp_norm = FusedRMSNorm(block.attn_norm), FusedRMSNorm(block.mlp_norm)
        if type(attn) is CausalSelfAttention and all(map(computes_x_wt, (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                          attn.o_proj))):
            block.attn = FusedAttention(attn, transposed)
        if type(mlp) is MLP and all(map(computes_x_wt, (mlp.gate_proj, mlp.up_proj, mlp.down_proj))):
            block.mlp = FusedMLP(mlp, transposed)
    model.norm = FusedRMSNorm(model.norm)
    if computes_x_wt(model.lm_head):  # tied: a transposed copy would double the largest matrix's memory; share it
        model.lm_head = Projection(model.lm_head.weight, transposed and not model.config.tie_embeddings)
    return model


def computes_x_wt(module: nn.Module) -> bool:
    """A plain nn.Linear without bias, or a LoRA layer merged into its weight: y = x W^T, so W can be fused."""
    plain = type(module) is nn.Linear or (isinstance(module, LoRALinear) and module.merged)
    return plain and module.bias is None


def compile_decoding(model: LLaMA) -> LLaMA:
    """torch.compile the one-token decoding step, in place; the prefill stays eager. Fuse the model with
    fuse_for_inference(model, for_compile=True) first: its products of one row then compile into loops over the
    weights (matvec) rather than calls to the matrix-multiply library.

    A decoding step has the same shapes at every token (the new token (B, 1), the KV cache), so one compilation
    serves them all; a prompt of a new length would be a new compilation, so the prefill is not compiled. Each new
    shape (batch size, KV cache length) compiles on its first step, which then takes seconds to minutes: the time
    is added up in model.compile_seconds, so callers can report it apart from decoding."""
    eager = model.forward
    step = torch.compile(eager, dynamic=False, fullgraph=True)
    compiled_shapes = set()

    def forward(idx: torch.Tensor, input_pos=None, logits_at=None) -> torch.Tensor:
        if input_pos is None or idx.size(1) != 1 or logits_at is not None:
            return eager(idx, input_pos, logits_at)  # the prefill, or a plain forward
        shapes = (idx.shape, model.blocks[0].attn.kv_cache.k.shape)
        if shapes in compiled_shapes:
            return step(idx, input_pos)
        start = time.perf_counter()
        logits = step(idx, input_pos)  # compiles for these shapes, then runs
        model.compile_seconds += time.perf_counter() - start
        compiled_shapes.add(shapes)
        return logits

    model.forward = forward  # this model only (an instance attribute): nn.Module.__call__ calls it
    model.compile_seconds = 0.0
    return model
