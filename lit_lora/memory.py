"""How much memory (and compute) a finetuning step takes, worked out before running it.

A training step holds five kinds of tensors at its peak:

    weights      every parameter, trainable or frozen, in the parameter dtype, which the training loop sets
                 from the precision (lit_lora/train.py): fp32 under 32-true and the mixed precisions (the
                 frozen base too, whatever the checkpoint's dtype), bf16 under bf16-true
    gradients    one per *trainable* parameter, in the parameter dtype
    optimizer    AdamW's two moments (m and v) per *trainable* parameter. torch's AdamW creates them with
                 zeros_like(param), so they are in the parameter dtype: fp32 under 32-true and the mixed
                 precisions, bf16 under bf16-true
    activations  what autograd saves in the forward pass for the backward pass (see `saved_tensors`)
    logits       the fp32 log-probabilities of the loss and, at the start of the backward pass, their
                 gradient and the gradient of the logits: 3 x 4 bytes x (label positions) x vocabulary

So full finetuning in bf16-true costs 2 + 2 + 4 = 8 bytes per parameter before any activation (LLaMA 7B:
54 GB), and 4 + 4 + 8 = 16 with fp32 weights (108 GB): more than one 80 GB GPU holds. LoRA and
LLaMA-Adapter pay the weight's bytes per frozen parameter (bf16-true: 2, 13.5 GB for 7B; 32-true or mixed:
4, 27 GB) and nothing more for them: no gradient and no optimizer state for W0. Their activations stay: the
backward pass still has to run through every layer above the lowest trainable one.

Under FSDP (full finetuning on several devices) each device holds 1/devices of the weights, gradients and
moments, plus the Block it is computing, gathered whole. The training loop reduce-scatters the gradients
after every micro batch under FSDP, so they stay sharded during gradient accumulation too.

The total is `weights + gradients + optimizer + max(activations + logits, optimizer step scratch)`:
gradients are counted in full while the activations are alive, which is exact from the second micro batch
of an accumulating step on (an upper bound for the first); the scratch is the temporary sqrt(v) that the
multi-tensor AdamW on a GPU allocates for all trainable parameters at once, once the activations are gone.
Left out: a few layer-sized temporaries of the backward pass, the RoPE cache, the CUDA context (~0.5 GB,
not in torch.cuda.max_memory_allocated) and the caching allocator's reserved-but-free blocks (in
nvidia-smi's figure, not in max_memory_allocated).

Everything here is arithmetic on a `Config`: nothing is built, so 70B is as quick as `micro`.
"""

from dataclasses import dataclass, field
from typing import Literal, Optional

from lit_lora.lora import LORA_TARGETS
from lit_lora.model import Config
from lit_lora.utils import format_bytes

METHODS = ("lora", "adapter", "full")
# Bytes per element: (parameters, gradients and AdamW moments; activations). Mixed precision keeps fp32
# weights and computes in 16 bits.
PRECISION_BYTES = {"32-true": (4, 4), "bf16-true": (2, 2), "bf16-mixed": (4, 2), "16-mixed": (4, 2)}


@dataclass
class TrainingSetup:
    """What the memory of a training step depends on, besides the model's Config.

    Defaults are the LoRA reference setup (Alpaca-LoRA / Lit-LLaMA) on a GPU.
    """

    method: Literal["lora", "adapter", "full"] = "lora"
    precision: str = "bf16-true"
    micro_batch_size: int = 4
    seq_length: int = 256  # T: the longest example of the micro batch (the batch is padded to it)
    label_fraction: float = 1.0  # share of the B x T positions that predict a label (get logits)
    device: Literal["cuda", "cpu"] = "cuda"  # dropout masks: 1 byte on CUDA, a full float on a CPU
    devices: int = 1  # full finetuning on several devices shards weights, gradients and optimizer (FSDP)
    activation_checkpointing: bool = False  # keep only each Block's input; recompute the rest in the backward
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_dropout: float = 0.05
    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"Unknown precision {self.precision!r}: choose one of {', '.join(PRECISION_BYTES)}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"Unknown LoRA target(s) {unknown}: valid targets are {', '.join(LORA_TARGETS)}")
        self.lora_targets = tuple(self.lora_targets)


# ---------------------------------------------------------------------------------------------------------
# Parameters


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer a LoRA target names (q..down in every Block; head once)."""
    C, kv = config.n_embd, config.n_query_groups * config.head_size
    I, V = config.intermediate_size, config.padded_vocab_size
    return {"q": (C, C), "k": (C, kv), "v": (C, kv), "o": (C, C),
            "gate": (C, I), "up": (C, I), "down": (I, C), "head": (C, V)}


def block_parameters(config: Config) -> int:
    """Parameters of one Block: q, k, v, o, gate, up, down and two RMSNorm weights."""
    return sum(d_in * d_out for name, (d_in, d_out) in linear_shapes(config).items() if name != "head") \
        + 2 * config.n_embd


def count_parameters(config: Config, setup: TrainingSetup) -> tuple[int, int]:
    """(trainable, total) parameters of the model that `setup.method` trains, by arithmetic."""
    shapes = linear_shapes(config)
    C, L = config.n_embd, config.n_layer
    if setup.method == "adapter" and setup.adapter_start_layer >= L:
        raise ValueError(f"adapter_start_layer ({setup.adapter_start_layer}) must be below the model's n_layer ({L})")
    base = L * block_parameters(config) + 2 * config.padded_vocab_size * C + C  # + embedding, lm_head, final norm
    if setup.method == "full":
        return base, base
    if setup.method == "lora":  # A (r x d_in) and B (d_out x r) per targeted linear: r (d_in + d_out)
        added = sum(setup.lora_r * sum(shapes[t]) * (1 if t == "head" else L) for t in setup.lora_targets)
    else:  # adapter: a prompt (K x C) and a gate per head in each layer from start_layer up
        added = (L - setup.adapter_start_layer) * (setup.adapter_prompt_length * C + config.n_head)
    return added, base + added


# ---------------------------------------------------------------------------------------------------------
# Activations


def saved_tensors(config: Config, setup: TrainingSetup) -> dict[str, int]:
    """Bytes of each tensor autograd keeps from one training forward (loss included) for the backward pass.

    This follows lit_lora/model.py (and lora.py, adapter.py, train.loss_sum) op by op, with autograd's rules:
    - an op saves what its backward needs, only for the inputs that need a gradient: y = x W^T saves x if W
      trains (dW = dy^T x) and W if x needs a gradient (dx = dy W; W is already counted as a weight);
    - a tensor saved by several ops is stored once: this dict is keyed by tensor, not by op;
    - an op none of whose inputs needs a gradient saves nothing: the layers below the first adapter layer,
      or LoRA's first RMSNorm (the frozen embedding's output needs no gradient).

    With B x T = R rows, C = n_embd, I = intermediate_size, H = n_head, V = padded vocabulary, N = label
    positions, s = bytes per activation, a Block that trains everything saves (full finetuning):
        RMSNorm x 2      4RC (fp32 input) + 4R (1/rms) + sR C (normalised input, for the weight's gradient)
        q/k/v, gate/up   their shared input: sRC each
        attention        q, k, v (k and v repeated to H heads: sRC each), the output sRC, log-sum-exp 4BHT.
                         Flash / memory-efficient SDPA saves O(T) per query, never the T x T matrix
        o_proj           its input is the attention output, already saved
        MLP              gate output, silu output, up output, their product: 4 sRI
    i.e. (8 + 8s) RC + 4sRI + 8R + 4BHT per Block: 24 RC + 8 RI + ... bytes in bf16-true.
    LoRA on a linear adds the r-wide middle (sRr) and its input: dropout(x) (sR d_in) and, where x needs a
    gradient, the dropout mask (1 byte per element on CUDA, a float on a CPU); without dropout, x itself.
    The head saves the final RMSNorm's tensors, the (B, T) bool label mask, the lm_head input (sNC, if it
    trains), the fp32 log-probabilities (4NV) and the targets (8N).
    Exact for 32-true and bf16-true (tests/test_compare.py checks it against what autograd saves); under
    autocast (the mixed precisions) some saved tensors have other dtypes, and the figure is approximate.
    """
    c, st = config, setup
    _, s = PRECISION_BYTES[st.precision]
    B, T = st.micro_batch_size, st.seq_length
    R, C, I, H, V = B * T, c.n_embd, c.intermediate_size, c.n_head, c.padded_vocab_size
    N = round(R * st.label_fraction)
    full = st.method == "full"
    lora_targets = set(st.lora_targets) if st.method == "lora" else set()
    lora_dropout = st.method == "lora" and st.lora_dropout > 0
    mask_bytes = 1 if st.device == "cuda" else s
    shapes = linear_shapes(c)
    saved: dict[str, int] = {}

    def rms_norm(name: str, x_grad: bool, rows: int) -> bool:
        """x * rsqrt(mean(x^2) + eps) in fp32, times weight. Returns whether its output needs a gradient."""
        if x_grad:
            saved[f"{name}.input_fp32"] = 4 * rows * C
            saved[f"{name}.rms"] = 4 * rows
        if full:
            saved[f"{name}.normalized"] = s * rows * C
        return x_grad or full

    def linear(name: str, target: str, x: str, x_grad: bool, rows: int) -> bool:
        """y = x W^T (+ scaling * dropout(x) A^T B^T). Returns whether y needs a gradient."""
        d_in = shapes[target][0]
        if full:
            saved[x] = s * rows * d_in
        if target in lora_targets:
            if lora_dropout:
                saved[f"{name}.dropout_output"] = s * rows * d_in
                if x_grad:
                    saved[f"{name}.dropout_mask"] = mask_bytes * rows * d_in
            else:
                saved[x] = s * rows * d_in
            saved[f"{name}.lora_middle"] = s * rows * st.lora_r
        return x_grad or full or target in lora_targets

    x_grad = full  # the embedding's output needs a gradient only if the embedding trains
    if full:
        saved["embed.indices"] = 8 * R  # int64 token ids
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        adapted = st.method == "adapter" and i >= st.adapter_start_layer
        # x + attn(attn_norm(x))
        h_grad = rms_norm(p + "attn_norm", x_grad, R)
        qkv_grad = [linear(p + t, t, p + "attn_norm.output", h_grad, R) for t in ("q", "k", "v")]
        attn_grad = any(qkv_grad)
        if attn_grad:  # scaled_dot_product_attention saves its inputs, its output and the log-sum-exp
            for t in ("q", "k", "v"):
                saved[p + t] = s * R * C  # with grouped-query attention, k and v after repeat_interleave
            saved[p + "attention_output"] = s * R * C
            saved[p + "attention_lse"] = 4 * B * H * T
        if adapted:  # softmax(q prompt_k^T) prompt_v, gated: saves q, the prompt's k and v, output, lse
            K = st.adapter_prompt_length
            saved[p + "q"] = s * R * C
            saved[p + "prompt_k"] = saved[p + "prompt_v"] = s * K * C
            saved[p + "prompt_output"] = s * R * C  # also what the gate's gradient needs
            saved[p + "prompt_lse"] = 4 * B * H * T
            attn_grad = True
        o_input = p + ("attention_mixed" if adapted else "attention_output")  # the adapter adds a new tensor
        x_grad = linear(p + "o", "o", o_input, attn_grad, R) or x_grad
        # x + down(silu(gate(h)) * up(h)), h = mlp_norm(x)
        h_grad = rms_norm(p + "mlp_norm", x_grad, R)
        gate_grad = linear(p + "gate", "gate", p + "mlp_norm.output", h_grad, R)
        up_grad = linear(p + "up", "up", p + "mlp_norm.output", h_grad, R)
        if gate_grad:
            saved[p + "gate_output"] = s * R * I  # silu's input
            saved[p + "up_output"] = s * R * I  # the product's gradient with respect to silu(gate)
        if up_grad:
            saved[p + "silu_output"] = s * R * I  # the product's gradient with respect to up
        x_grad = linear(p + "down", "down", p + "mlp_product", gate_grad or up_grad, R) or x_grad
    # the loss: cross-entropy of the logits at the N label positions
    h_grad = rms_norm("head.norm", x_grad, R)
    if h_grad:
        saved["head.logits_at"] = R  # x[logits_at] saves the (B, T) bool mask
    linear("head.lm_head", "head", "head.lm_head_input", h_grad, N)
    saved["head.log_probs"] = 4 * N * V  # log_softmax in fp32 saves its output
    saved["head.targets"] = 8 * N  # int64
    saved["head.total_weight"] = 4  # nll_loss's normaliser, a fp32 scalar
    return saved


# ---------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training step's peak memory on one device (see the module docstring)."""

    setup: TrainingSetup
    trainable_parameters: int
    total_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    optimizer_scratch: int
    saved: dict = field(default_factory=dict, repr=False)  # `saved_tensors`, for the curious

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + max(self.activations + self.logits,
                                                                    self.optimizer_scratch)

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                "activations": self.activations, "logits (loss)": self.logits,
                "AdamW step scratch": self.optimizer_scratch, "total": self.total}


def estimate_memory(config: Config, setup: Optional[TrainingSetup] = None) -> MemoryEstimate:
    """The peak memory of one device in a training step of `config` with `setup` (default: TrainingSetup())."""
    setup = setup or TrainingSetup()
    param_bytes, s = PRECISION_BYTES[setup.precision]
    trainable, total = count_parameters(config, setup)
    weights, gradients, optimizer = total * param_bytes, trainable * param_bytes, 2 * trainable * param_bytes
    if setup.device == "cuda":  # multi-tensor AdamW: sqrt(v) for all trainable tensors at once
        scratch = trainable * param_bytes
    else:  # one tensor at a time: sqrt(v), then sqrt(v) / bias correction, of the largest tensor
        scratch = 2 * largest_trainable_tensor(config, setup) * param_bytes
    if setup.method == "full" and setup.devices > 1:
        # FSDP: every device holds 1/devices of the weights, gradients and moments, plus the Block it computes,
        # gathered in full (weights and gradients)
        block = block_parameters(config)
        weights = weights // setup.devices + block * param_bytes
        gradients = gradients // setup.devices + block * param_bytes
        optimizer //= setup.devices
        scratch //= setup.devices

    saved = saved_tensors(config, setup)
    log_probs = saved["head.log_probs"]
    if setup.activation_checkpointing:  # each Block's input, plus one Block's tensors while it is recomputed
        per_block = [sum(v for k, v in saved.items() if k.startswith(f"blocks.{i}.")) for i in range(config.n_layer)]
        rest = sum(v for k, v in saved.items() if not k.startswith("blocks."))
        activations = config.n_layer * s * setup.micro_batch_size * setup.seq_length * config.n_embd \
            + max(per_block, default=0) + rest - log_probs
    else:
        activations = sum(saved.values()) - log_probs
    if param_bytes != s:  # autocast (approximate): the 16-bit copy of each linear weight is kept for backward
        shapes = linear_shapes(config)
        activations += s * (config.n_layer * sum(i * o for t, (i, o) in shapes.items() if t != "head")
                            + shapes["head"][0] * shapes["head"][1])
    return MemoryEstimate(setup, trainable, total, weights, gradients, optimizer, activations, 3 * log_probs,
                          scratch, saved)


def largest_trainable_tensor(config: Config, setup: TrainingSetup) -> int:
    shapes = linear_shapes(config)
    if setup.method == "full":
        return max(d_in * d_out for d_in, d_out in shapes.values())  # the embedding / lm_head
    if setup.method == "lora":
        return max(setup.lora_r * max(shapes[t]) for t in setup.lora_targets)
    return setup.adapter_prompt_length * config.n_embd


def format_estimates(estimates: dict[str, MemoryEstimate]) -> str:
    """A Markdown table: one row per part of the memory, one column per estimate."""
    names = list(estimates)
    header = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    lines = []
    first = next(iter(estimates.values()))
    for part in first.parts():
        cells = [format_bytes(e.parts()[part]) for e in estimates.values()]
        label = f"**{part}**" if part == "total" else part
        lines.append(f"| {label} | " + " | ".join(f"**{c}**" if part == "total" else c for c in cells) + " |")
    trainable = [f"{e.trainable_parameters:,} ({100 * e.trainable_parameters / e.total_parameters:.2f}%)"
                 for e in estimates.values()]
    lines.insert(0, "| trainable parameters | " + " | ".join(trainable) + " |")
    return header + "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Compute, for the time column


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
    c, st = config, setup
    shapes = linear_shapes(c)
    R = st.micro_batch_size * st.seq_length
    N = R * st.label_fraction
    block_linear = 2 * sum(i * o for t, (i, o) in shapes.items() if t != "head")  # per row
    attention = 2 * 2 * c.n_embd * st.seq_length / 2  # q k^T and p v, T/2 keys per query
    head = 2 * shapes["head"][0] * shapes["head"][1]  # per label row
    lora = {t: 2 * st.lora_r * sum(shapes[t]) for t in st.lora_targets} if st.method == "lora" else {}
    adapter = 2 * 2 * c.n_embd * st.adapter_prompt_length if st.method == "adapter" else 0  # per row and layer

    if st.method == "full":
        lowest = 0
    elif st.method == "lora":
        lowest = 0 if set(st.lora_targets) - {"head"} else c.n_layer
    else:
        lowest = st.adapter_start_layer
    adapted_layers = c.n_layer - st.adapter_start_layer if st.method == "adapter" else 0
    lora_blocks = sum(v for t, v in lora.items() if t != "head")
    forward = R * (c.n_layer * (block_linear + attention + lora_blocks) + adapted_layers * adapter) \
        + N * (head + lora.get("head", 0))
    layers_backward = c.n_layer - lowest  # the gradient flows from the loss down to the lowest trainable layer
    backward_input = N * head + R * layers_backward * (block_linear + 2 * attention) \
        + R * adapted_layers * 2 * adapter + R * c.n_layer * lora_blocks
    if st.method == "full":
        backward_weight = R * c.n_layer * block_linear + N * head
    else:  # only A and B (LoRA), or the prompts (whose gradient is per layer, not per row: negligible)
        backward_weight = R * c.n_layer * lora_blocks + N * lora.get("head", 0)  # dA and dB
    return {"forward": forward, "backward_input": backward_input, "backward_weight": backward_weight,
            "total": forward + backward_input + backward_weight}
