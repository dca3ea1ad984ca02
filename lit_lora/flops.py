"""How much compute a finetuning step takes, worked out before running it: the time column of finetune/compare.py
(its memory: lit_lora/memory.py). Arithmetic on a `Config`, like the memory estimate. And how close a run comes to
the machine's limit: the FLOPs of its real tokens per second, against the speed of a matrix product measured in the run.
"""

import time
from dataclasses import replace

import torch

from lit_lora.memory import METHOD_HYPERPARAMETERS, TrainingSetup, block_linear_parameters, linear_shapes
from lit_lora.model import Config


def step_flops(config: Config, setup: TrainingSetup) -> dict[str, float]:
    """Matmul FLOPs of one micro batch: forward, backward to the inputs, backward to the weights.

    A linear layer costs 2 d_in d_out FLOPs per row forward; its backward costs that again for the input's
    gradient (dx = dy W) and again for the weight's (dW = dy^T x). Full finetuning pays all three (about 3x
    the forward). LoRA skips only the weight gradient of the frozen W0, but the input gradients still flow
    through every layer down to the LoRA matrices of the first one (about 2x the forward): about a third less
    compute, and less in wall-clock time, because the skipped matmuls are only part of a step.
    LLaMA-Adapter also skips the whole backward pass of the layers below `start_layer`.
    Attention (q k^T and the weighted sum over v) is counted with causal masking: T/2 keys per query on
    average; its backward computes dq, dk and dv: twice its forward.
    """
    shapes, L = linear_shapes(config), config.n_layer
    R = setup.micro_batch_size * setup.seq_length
    N = R * setup.label_fraction
    # FLOPs of each part's forward, per row (per row and layer for the adapter)
    block_linear = 2 * block_linear_parameters(config)
    attention = 2 * 2 * config.n_embd * setup.seq_length / 2  # q k^T and p v, T/2 keys per query
    head = 2 * shapes["head"][0] * shapes["head"][1]  # per label row
    lora = ({target: 2 * setup.lora_r * sum(shapes[target]) for target in setup.lora_targets}
            if setup.uses_lora else {})
    adapter = 2 * 2 * config.n_embd * setup.adapter_prompt_length if setup.method == "adapter" else 0

    if setup.method == "full":
        lowest_trainable_layer = 0
    elif setup.uses_lora:
        lowest_trainable_layer = 0 if set(setup.lora_targets) - {"head"} else L
    else:
        lowest_trainable_layer = setup.adapter_start_layer
    adapted_layers = L - setup.adapter_start_layer if setup.method == "adapter" else 0
    lora_in_blocks = sum(flops for target, flops in lora.items() if target != "head")
    forward = R * (L * (block_linear + attention + lora_in_blocks) + adapted_layers * adapter) \
        + N * (head + lora.get("head", 0))
    layers_backward = L - lowest_trainable_layer  # the gradient flows from the loss down to the lowest trainable layer
    backward_input = N * head + R * layers_backward * (block_linear + 2 * attention) \
        + R * adapted_layers * 2 * adapter + R * L * lora_in_blocks
    if setup.method == "full":
        backward_weight = R * L * block_linear + N * head
    else:  # only A and B (LoRA), or the prompts (whose gradient is per layer, not per row: negligible)
        backward_weight = R * L * lora_in_blocks + N * lora.get("head", 0)  # dA and dB
    reference = forward if setup.reference_forward else 0  # DPO's reference: the same forward, LoRA off (about)
    return {"forward": forward, "backward_input": backward_input, "backward_weight": backward_weight,
            "reference": reference, "total": forward + backward_input + backward_weight + reference}


def run_setup(args, precision: str) -> TrainingSetup:
    """The setup of a finetuning run from its flags (LoRAArgs, AdapterArgs, FullArgs): its method and its
    hyperparameters, for the FLOPs of its examples."""
    method = type(args).__name__.removesuffix("Args").lower()  # LoRAArgs -> lora
    dpo = method == "dpo"  # LoRA, with a reference forward pass (lit_lora/dpo.py)
    method = "qlora" if method in ("lora", "dpo") and getattr(args, "quantize", None) else "lora" if dpo else method
    return TrainingSetup(method=method, precision=precision, micro_batch_size=1, reference_forward=dpo,
                         **{name: getattr(args, name) for name in METHOD_HYPERPARAMETERS if hasattr(args, name)})


def example_flops(config: Config, setup: TrainingSetup, tokens: int, label_tokens: int) -> float:
    """Matmul FLOPs of one example's forward and backward as if alone in its row: its real tokens only, what a
    packed row computes (padding adds the FLOPs of positions that carry nothing)."""
    one = replace(setup, micro_batch_size=1, seq_length=tokens, label_fraction=label_tokens / max(1, tokens))
    return step_flops(config, one)["total"]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of a precision's matrix products (on a CPU, Fabric's 16-mixed is bf16)."""
    if precision.startswith("bf16") or (precision == "16-mixed" and device.type == "cpu"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """The FLOP/s of this device multiplying two square matrices in `dtype`, measured now: the ceiling that the
    matrix products of a training step can approach. The fastest of the products that fit in `seconds` after a
    warm-up one (the best, not the mean: a shared or throttled machine only ever slows a product down)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    best = spent = timed()  # warm-up; where one product takes longer than `seconds` (emulated bf16), the only one
    while spent < seconds:
        duration = timed()
        best, spent = min(best, duration), spent + duration
    return 2 * n ** 3 / best
