"""QLoRA's 4-bit base model: the frozen weights of every Block stored in 4-bit NormalFloat (NF4), with bitsandbytes.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314)
is LoRA (lit_lora/lora.py) on a base model whose frozen weights W0 are stored in 4 bits and turned back into
16 or 32 bits on the fly, one matrix at a time, inside each matmul. Only A and B train, in full precision:

    h = dequantize(W0_nf4) x + (alpha / r) * B A x

NF4, the numbers. A weight matrix is read as one long row (row after row) and cut into blocks of 64 weights.
Each block keeps one scale, its absolute maximum absmax = max |w| (fp32), and each weight w of the block is
stored as the 4-bit index i of the level q_i nearest to w / absmax, one of these 16 levels in [-1, 1]:

    -1.0000 -0.6962 -0.5251 -0.3949 -0.2844 -0.1848 -0.0911  0.0000
     0.0796  0.1609  0.2461  0.3379  0.4407  0.5626  0.7230  1.0000

and read back as w ~ q_i * absmax. The levels are not evenly spaced: they are quantiles of the normal
distribution N(0, 1), scaled to [-1, 1] (`nf4_levels` computes them; NF4_LEVELS holds them). Pretrained
weights are close to normal, so each level is used about equally often (more levels near 0, where most
weights are), and 0 is a level, so a zero weight stays exactly zero. One scale per 64 weights keeps one large weight from
crushing the others of its matrix into a few levels: only its own block pays. `nf4_reference` is the whole
computation in plain torch; bitsandbytes' kernels compute the same numbers (tests/test_quantize.py checks it).

Memory per weight. The index: 4 bits, 0.5 byte. The scale: 4 bytes per block of 64, 0.0625 byte. So 0.5625
byte per weight (`bnb.nf4`), against 2 for bf16 and 4 for fp32. Double quantization (`bnb.nf4-dq`) quantizes
the scales again: each fp32 absmax becomes 8 bits (bitsandbytes' 8-bit dynamic code, after subtracting their
mean), with one fp32 scale per block of 256 absmax values: 1/64 + 4/(64 * 256) = 0.0159 byte per weight for
the scales instead of 0.0625, so 0.5159 byte per weight; 3 GB less for a 65B model (0.373 bits per weight).
For LLaMA 7B, whose Blocks hold 6.5B of its 6.7B weights: 13.0 GB in bf16 become 3.6 GB (nf4) or 3.3 GB
(nf4-dq). The embedding, the norms and lm_head stay in the compute dtype (they are 4% of 7B).

Computing with it. y = x W^T calls bitsandbytes' `matmul_4bit`, which dequantizes W (q_i * absmax for every
weight) and multiplies, in x's dtype: W exists in 16/32 bits only for the time of one matmul. The backward pass needs
dx = dy W, for the LoRA matrices of the layers below, and dequantizes W again; W itself gets no gradient
(it is frozen, and a 4-bit number could not take a small step anyway). Dequantizing costs time: QLoRA trades
speed for memory (measured in howto/finetune_qlora.md).

LoRA on a 4-bit W0 is `LoRALinear4bit`: lit_lora/lora.py's LoRALinear, whose base product is the 4-bit one and
which refuses to merge (W0 + dW rounded to 4 bits again would lose most of dW).

Loading never holds the 16-bit model. `load_model_4bit` replaces each frozen nn.Linear of the Blocks by a
`Linear4bit`, one at a time, reading its weight from the memory-mapped checkpoint (lit_lora/checkpoint.py's
`load_model`), quantizing it on the device it will compute on, and handing its pages back to the kernel.

bitsandbytes is an optional extra: `pip install -e ".[quantize]"`. It is imported only when a weight is
quantized or multiplied, so lit-lora without it runs everything else.
"""

import copy
import ctypes
import logging
import mmap
import sys
from typing import Optional

import torch
import torch.nn as nn

from lit_lora.checkpoint import load_model
from lit_lora.lora import LoRALinear
from lit_lora.model import ConfigError, LLaMA

# --quantize's values: the mode, and whether it uses double quantization
QUANTIZE_MODES = {"bnb.nf4": False, "bnb.nf4-dq": True}
BLOCK_SIZE = 64  # weights per absmax scale (the QLoRA paper's, and bitsandbytes' default)
# The 16 NF4 levels as bitsandbytes stores them (fp32; `nf4_levels` derives them, to within 2e-7)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
INSTALL_HINT = "pip install -e '.[quantize]' (or pip install bitsandbytes)"


def check_quantize(mode: Optional[str]) -> None:
    """Refuse a `quantize` value that is not a mode, and a mode when bitsandbytes is missing (which extra to install)."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise ConfigError("quantize", mode, "is not a quantization mode; choose bnb.nf4 (4-bit NormalFloat) or "
                          "bnb.nf4-dq (with double quantization), or none (see howto/finetune_qlora.md)")
    require_bitsandbytes(f"4-bit quantization ({mode})")


def require_bitsandbytes(what: str = "4-bit weights"):
    """The bitsandbytes module, or an ImportError saying how to install it."""
    # bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a faster kernel from the Hugging Face Hub when it is
    # imported, and warns "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot (offline, or
    # without the `kernels` package). It then uses its own kernel, which tests/test_quantize.py checks: harmless here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bitsandbytes


# ---------------------------------------------------------------------------------------------------------
# NF4 in plain torch: what bitsandbytes computes, written out to read (and to test bitsandbytes against)


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels: 8 positive and 7 negative quantiles of N(0, 1), and 0, scaled to [-1, 1].

    The quantiles are taken at probabilities evenly spaced from 0.5 (the median, 0) up to `outer`, which is
    chosen between the outermost probabilities of 15 and of 16 equal slices, so that the extreme levels are
    finite (the quantile of 1.0 would be infinite); dividing by the largest makes them -1 and 1."""
    outer = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))  # 0.9677
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(outer, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -normal.icdf(torch.linspace(outer, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()  # (16,)


def nf4_reference(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Quantize `weight` to NF4 and back, in plain torch: blocks of `block_size` consecutive weights, each
    with its absmax scale, each weight rounded to the nearest of the 16 levels. Returns the dequantized
    weight, (d_out, d_in) like the input: what the model computes with."""
    flat = weight.float().reshape(-1)
    n_blocks = -(-flat.numel() // block_size)  # the last block may be partial: padded with zeros
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1): one scale per block
    levels = torch.tensor(NF4_LEVELS)  # (16,)
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)  # in [-1, 1]
    codes = (normalized.unsqueeze(-1) - levels).abs().argmin(dim=-1)  # (n_blocks, block_size): 4-bit indices
    return (levels[codes] * absmax).reshape(-1)[:flat.numel()].view(weight.shape)


# ---------------------------------------------------------------------------------------------------------
# 4-bit weights with bitsandbytes


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether a weight is a bitsandbytes 4-bit weight (Params4bit): a uint8 tensor of packed indices, two per
    byte, that carries its quantization state (absmax scales, the levels, the shape and dtype it came from)."""
    return getattr(weight, "quant_state", None) is not None


def quantize_nf4(weight: torch.Tensor, double_quantization: bool = False, device=None) -> torch.Tensor:
    """`weight` (d_out, d_in) as a bitsandbytes NF4 weight on `device` (default: where it is): the 4-bit
    indices, packed two per byte, ((d_out * d_in + 1) // 2, 1) uint8, and their quantization state."""
    bnb = require_bitsandbytes()
    packed = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4", blocksize=BLOCK_SIZE,
                               compress_statistics=double_quantization)
    return packed.to(device or weight.device)  # bitsandbytes quantizes when the weight moves to its device


def linear_4bit(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for a 4-bit W: (..., d_in) -> (..., d_out), in x's dtype. W is dequantized inside the matmul
    (forward, and again in the backward pass for x's gradient) and never kept in 16 or 32 bits."""
    bnb = require_bitsandbytes()
    if weight.quant_state.shape[-1] % BLOCK_SIZE:  # rows that are not whole blocks: see dequantize_nf4
        return FlatMatmul4bit.apply(x, weight)
    return bnb.matmul_4bit(x, weight, quant_state=weight.quant_state)


class FlatMatmul4bit(torch.autograd.Function):
    """matmul_4bit for weights whose rows are not whole blocks, with dequantize_nf4: W is dequantized in the
    forward pass and again in the backward pass (dx = dy W), and only the 4-bit weight is saved between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x @ dequantize_nf4(weight).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_output @ dequantize_nf4(weight).to(grad_output.dtype), None


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """W (d_out, d_in) back from its NF4 form: q_i * absmax of its block, for every weight.

    Dequantized as one flat row of blocks and reshaped. bitsandbytes 0.50.2's CPU kernel, on a CPU with AVX512-BF16,
    dequantizes (and multiplies) a (d_out, d_in) weight wrongly when d_in is a multiple of 16 but not of 64, so that
    blocks straddle rows (measured: d_in 16, 32, 48, 96); flat, it is right for every shape (tests/test_quantize.py).
    LLaMA-family models have d_in a multiple of 64 and never take this path; tiny test models do."""
    bnb = require_bitsandbytes()
    state = weight.quant_state
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([state.shape.numel()])
    return bnb.functional.dequantize_4bit(weight.view(-1), flat_state).view(state.shape)


class Linear4bit(nn.Linear):
    """A frozen linear layer (no bias) whose weight W (d_out, d_in) is stored in NF4: y = x dequantize(W)^T.

    An nn.Linear for the rest of the code (in_features, out_features, `weight`), so LoRA wraps it as it wraps any
    linear layer, with LoRALinear4bit (`lora_class`, which lit_lora/lora.py's apply_lora asks for). bitsandbytes' own
    Linear4bit module would do the same matmul; this one keeps only that call, in `linear_4bit`.
    """

    def __init__(self, weight: torch.Tensor, double_quantization: bool = False, device=None):
        d_out, d_in = weight.shape
        super().__init__(d_in, d_out, bias=False, device="meta")  # allocates nothing
        self.weight = quantize_nf4(weight, double_quantization, device)  # a Params4bit: frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight)

    @property
    def lora_class(self) -> type:
        """The layer lit_lora/lora.py's apply_lora wraps this one in (it asks every linear for its `lora_class`)."""
        return LoRALinear4bit


class LoRALinear4bit(LoRALinear, Linear4bit):
    """LoRA on a 4-bit W0 (QLoRA): LoRALinear's forward, whose `super().forward` is Linear4bit's 4-bit product, and
    A and B in the dtype W0 was quantized from. Merging is refused: W0 + dW would have to be rounded to 4 bits
    again, which would lose most of dW, so LoRA stays unmerged on a 4-bit base."""

    def __init__(self, linear: Linear4bit, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__(linear, r, alpha, dropout, dtype=linear.weight.quant_state.dtype)

    def merge(self) -> None:
        raise ValueError("Cannot merge LoRA into a 4-bit W0 (QLoRA): W0 + dW rounded to 4 bits again would lose "
                         "most of dW. Keep LoRA unmerged (generate/lora.py does on a 4-bit base), or load the "
                         "unquantized base to merge.")


def quantize_blocks(model: LLaMA, mode: str, device=None, dtype: Optional[torch.dtype] = None,
                    free_mapped_pages: bool = False) -> LLaMA:
    """Replace every frozen nn.Linear of the model's Blocks (q, k, v, o, gate, up, down) by a Linear4bit, in
    place, one weight at a time: each is converted to `dtype` (if given), quantized on `device` (default: a GPU if
    there is one), and dropped before the next is read. The embedding, the norms and lm_head are left as they are
    (in `dtype`, if given).

    free_mapped_pages: the weights are memory-mapped from a checkpoint file and never read again (load_model_4bit):
    after quantizing one, hand its pages back to the kernel (`release_pages`). Never for weights in ordinary
    memory, whose contents that would erase.
    """
    check_quantize(mode)
    if hasattr(model, "lora_config"):
        raise ValueError("Quantize the base model before applying LoRA: LoRA wraps the 4-bit linear layers")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for block in model.blocks:
        for name, linear in list(block.named_modules()):
            if type(linear) is not nn.Linear:  # the seven frozen linears; already 4-bit ones are left alone
                continue
            parent_name, _, attribute = name.rpartition(".")
            weight = linear.weight if dtype is None else linear.weight.to(dtype)  # one weight converted at a time
            quantized = Linear4bit(weight, QUANTIZE_MODES[mode], device).train(linear.training)
            setattr(block.get_submodule(parent_name), attribute, quantized)
            if free_mapped_pages:
                release_pages(linear.weight)
    if dtype is not None:  # the rest: embedding, norms, lm_head
        for param in model.parameters():
            if getattr(param, "quant_state", None) is None:
                param.data = param.data.to(dtype)
    model.quantization = mode  # recorded in the LoRA file (lit_lora/method_files.py)
    return model


def load_model_4bit(checkpoint_dir, mode: str, device=None, dtype: Optional[torch.dtype] = None) -> LLaMA:
    """lit_lora/checkpoint.py's load_model with the Blocks' linears in 4 bits, read one weight at a time from the
    memory-mapped checkpoint (quantize_blocks), so the 16/32-bit model is never in memory at once."""
    check_quantize(mode)
    return quantize_blocks(load_model(checkpoint_dir), mode, device, dtype, free_mapped_pages=True)


def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel this process no longer needs the memory pages of a tensor memory-mapped from a file
    (Linux: madvise(MADV_DONTNEED); elsewhere nothing). A page the process has read stays in its resident
    memory (RSS) as long as the file is mapped, which here is as long as the model lives: without this, every
    weight read for quantizing would still count there, as if the 16/32-bit model were loaded. Only whole
    pages inside the tensor are released; if read again, they would be read from the file again.
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # the first page boundary inside the tensor
    end = (tensor.data_ptr() + tensor.nbytes) // page * page  # the last one
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(4))  # 4: MADV_DONTNEED
