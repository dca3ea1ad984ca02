"""8-bit weights for decoding (--quantize int8): every weight matrix stored as int8, with one scale for each block
of 32 weights along a row (llama.cpp's Q8_0), and multiplied without ever making a full-precision copy of it.

At batch size 1 a decoding step reads every weight once, so its time is the time to read the weights
(inference.py). In 8 bits they are a quarter of the bytes they are in fp32: a quarter of the memory, and a quarter
of the reading. Q8_0 quantizes each block of 32 weights w_1..w_32 with the scale d = max|w_i| / 127:
q_i = round(w_i / d), an integer from -127 to 127, read back as w_i ~ d q_i. Each weight is off by at most d/2,
1/254 of the largest weight of its block. A product needs no dequantized W:

    y_j = sum_b d_jb sum_(i in block b) x_i q_ji

the inner sum over the 32 int8 weights of a block, then one product with the block's scale. In the compiled
decoding step (inference.py's compile_decoding) that is one loop streaming the int8 weights, as matvec streams
fp32 ones; eagerly (the prefill, --compile false), W is dequantized a slice of rows at a time and multiplied as
usual. The embedding table is stored the same way (a token's row dequantized when it is looked up), and a tied
lm_head shares it. Quantizing comes before fusing (q, k and v stacked into one matrix: their int8 rows and scales
are stacked the same way), so the fp32 weights are only read, never copied. A LoRA is merged before quantizing (W0 + alpha/r B A, rounded once). Inference only: training
never sees these modules.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.lora import LoRALinear

BLOCK = 32  # weights per scale, as Q8_0
ROWS_AT_ONCE = 4096  # eager products dequantize W this many rows at a time: a few MB, never the whole matrix


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (d_out, d_in) -> (q (d_out, d_in) int8, d (d_out, d_in / 32) fp16), as llama.cpp quantizes Q8_0 (bit for
    bit): d = max|w| / 127 in fp32, q = w * (1 / d) rounded half away from zero, then d stored in fp16."""
    d_out, d_in = weight.shape
    blocks = weight.float().reshape(d_out, d_in // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127  # (d_out, n_blocks)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # an all-zero block: q = 0
    scaled = blocks * inverse.unsqueeze(-1)
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)  # C's roundf: halves away from zero
    return q.reshape(d_out, d_in), scale.half()


def dequantize_q8_0(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """d q, block by block: the weights W ~ (d_out, d_in) that q and d stand for."""
    d_out, d_in = q.shape
    blocks = q.reshape(d_out, d_in // BLOCK, BLOCK).float() * scale.float().unsqueeze(-1)
    return blocks.reshape(d_out, d_in).to(dtype)


class Int8Linear(nn.Module):
    """y = x W^T with W stored as Q8_0: q (d_out, d_in) int8 and d (d_out, d_in / 32) fp16 buffers."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1 and x.device.type == "cpu":
            return int8_matvec(x, self.q, self.scale)  # one row, in the compiled step: one loop over q
        out = x.new_empty(*x.shape[:-1], self.q.size(0))
        for start in range(0, self.q.size(0), ROWS_AT_ONCE):  # eager: W a slice of rows at a time
            rows = slice(start, start + ROWS_AT_ONCE)
            out[..., rows] = F.linear(x, dequantize_q8_0(self.q[rows], self.scale[rows], x.dtype))
        return out


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y_j = sum_b d_jb sum_(i in b) x_i q_ji for one row x (..., d_in), as elementwise products and sums that
    torch.compile fuses into one loop over q (never run eagerly: it would write out x * q, the size of W in fp32)."""
    d_out, d_in = q.shape
    per_block = (x.reshape(d_in // BLOCK, BLOCK) * q.view(d_out, d_in // BLOCK, BLOCK)).sum(-1)  # (d_out, n_blocks)
    return (per_block * scale).sum(-1).to(x.dtype).view(*x.shape[:-1], d_out)


class Int8Embedding(nn.Module):
    """The embedding table stored as Q8_0: each token's row dequantized when it is looked up."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.q[idx].unflatten(-1, (-1, BLOCK)).float() * self.scale[idx].float().unsqueeze(-1)
        return rows.flatten(-2).to(self.dtype)  # (B, T, n_embd)


def can_quantize(module: nn.Module) -> bool:
    """A weight matrix Q8_0 can store: y = x W^T (a plain nn.Linear or a merged LoRA layer) without bias, its rows
    a whole number of blocks."""
    plain = isinstance(module, nn.Linear) and (not isinstance(module, LoRALinear) or module.merged)
    return plain and module.bias is None and module.weight.size(1) % BLOCK == 0


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Store every weight matrix of `model` (LoRA merged first) and its embedding table as Q8_0, in place, before
    inference.py fuses them (it stacks the int8 rows and their scales as it stacks fp32 weights): each matrix is read
    once, from the memory-mapped checkpoint, and no full-precision copy is made. The norms stay as they are, in the
    model's dtype; a matrix whose rows are not a whole number of blocks stays unquantized."""
    dtype, embedding = model.norm.weight.dtype, model.embed.weight
    if embedding.size(1) % BLOCK == 0:
        model.embed = Int8Embedding(*quantize_q8_0(embedding), dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is model.lm_head and isinstance(model.embed, Int8Embedding) and child.weight is embedding:
                setattr(parent, name, Int8Linear(model.embed.q, model.embed.scale))  # tied: the table's q and d
            elif can_quantize(child):
                setattr(parent, name, Int8Linear(*quantize_q8_0(child.weight)))
    return model
