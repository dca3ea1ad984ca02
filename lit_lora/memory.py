"""How much memory a finetuning step takes, worked out before running it (its compute: lit_lora/flops.py).

A training step holds five kinds of tensors at its peak:

    weights      every parameter, trainable or frozen, in the parameter dtype, which the training loop sets
                 from the precision (lit_lora/train.py): fp32 under 32-true and the mixed precisions (the
                 frozen base too, whatever the checkpoint's dtype), bf16 under bf16-true
    gradients    one per *trainable* parameter, in the parameter dtype
    optimizer    AdamW's two moments (m and v) per *trainable* parameter. torch's AdamW creates them with
                 zeros_like(param), so they are in the parameter dtype: fp32 under 32-true and the mixed
                 precisions, bf16 under bf16-true
    activations  what autograd saves in the forward pass for the backward pass (`saved_tensors`: model.py's
                 forward on paper, module by module), in the compute dtype: fp32 under 32-true, bf16 under
                 bf16-true and, for most of them, under the mixed precisions; a few are fp32 under every
                 precision (RMSNorm's input, attention's log-sum-exp)
    logits       the fp32 log-probabilities of the loss and, at the start of the backward pass, their
                 gradient and the gradient of the fp32 logits (train.loss_sum casts the logits to fp32 under
                 every precision): 3 x 4 bytes x (label positions) x vocabulary

So full finetuning in bf16-true costs 2 + 2 + 4 = 8 bytes per parameter before any activation (LLaMA 7B:
54 GB), and 4 + 4 + 8 = 16 with fp32 weights (108 GB): more than one 80 GB GPU holds. LoRA and
LLaMA-Adapter pay the weight's bytes per frozen parameter (bf16-true: 2, 13.5 GB for 7B; 32-true or mixed:
4, 27 GB) and nothing more for them: no gradient and no optimizer state for W0. Their activations stay: the
backward pass still has to run through every layer above the lowest trainable one.

QLoRA (method "qlora") is LoRA on a base whose Blocks' linear weights are stored in 4-bit NF4
(lit_lora/quantize.py): 0.5625 bytes per weight with its fp32 block scale, 0.5159 with double quantization
(NF4_BYTES), instead of 2 or 4. The embedding, the norms, lm_head and LoRA's A and B keep the parameter dtype;
gradients, optimizer state and activations are LoRA's (the 4-bit matmul keeps only the 4-bit weight for the
backward pass, and it is counted). For 7B in bf16-true the weights fall from 13.5 GB to 3.9 GB (nf4-dq).

Under FSDP each device keeps 1/devices of the weights, gradients and moments, plus the Block it computes,
gathered whole, with its whole gradients until they are reduce-scattered (after every micro batch).

The total is `weights + gradients + optimizer + max(activations + logits, optimizer step scratch)`:
gradients are counted in full while the activations are alive, which is exact from the second micro batch
of an accumulating step on (an upper bound for the first); the scratch is the temporary sqrt(v) that the
multi-tensor AdamW on a GPU allocates for all trainable parameters at once, once the activations are gone.
Left out: a few layer-sized temporaries of the backward pass (with QLoRA, also the dequantized weight of the
layer computing), the RoPE cache, the CUDA context (~0.5 GB) and
the caching allocator's reserved-but-free blocks (neither is in torch.cuda.max_memory_allocated); under FSDP,
the top-level module (embedding, final norm, lm_head) that fully_shard keeps gathered from its forward to the
end of the backward pass, and the next Block it gathers while one computes.

Everything here is arithmetic on a `Config`: nothing is built, so 70B is as quick as `micro`.
"""

from dataclasses import dataclass, field
from typing import Literal, Optional

from lit_lora.lora import LORA_TARGETS, LoRAConfig
from lit_lora.model import Config
from lit_lora.quantize import BLOCK_SIZE, QUANTIZE_MODES
from lit_lora.report import format_bytes

METHODS = ("lora", "qlora", "adapter", "full")
# Bytes per 4-bit weight (QLoRA, lit_lora/quantize.py): the 4-bit index, 1/2 byte, plus its share of its block's
# absmax scale: fp32 per 64 weights (bnb.nf4); with double quantization 8 bits per 64 weights and one fp32 scale per
# 256 of those (bnb.nf4-dq). Left out: a few constants per matrix (the levels, the scales' mean), under 1.1 KB.
NF4_BYTES = {"bnb.nf4": 1 / 2 + 4 / BLOCK_SIZE, "bnb.nf4-dq": 1 / 2 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * 256)}
# Bytes per element: (parameters, gradients and AdamW moments; activations). Mixed: fp32 weights, 16-bit compute.
PRECISION_BYTES = {"32-true": (4, 4), "bf16-true": (2, 2), "bf16-mixed": (4, 2), "16-mixed": (4, 2)}


# The fields of TrainingSetup that a method's script takes as flags of the same name (LoRAArgs, AdapterArgs)
METHOD_HYPERPARAMETERS = ("lora_r", "lora_targets", "lora_dropout", "adapter_prompt_length", "adapter_start_layer")


@dataclass
class TrainingSetup:
    """What the memory of a training step depends on, besides the model's Config.

    Defaults are the LoRA reference setup (Alpaca-LoRA / Lit-LLaMA) on a GPU.
    """

    method: Literal["lora", "qlora", "adapter", "full"] = "lora"
    precision: str = "bf16-true"
    micro_batch_size: int = 4
    seq_length: int = 256  # T: the longest example of the micro batch (the batch is padded to it)
    label_fraction: float = 1.0  # share of the B x T positions that predict a label (get logits)
    device: Literal["cuda", "cpu"] = "cuda"  # dropout masks: 1 byte on CUDA, the activations' dtype on a CPU
    devices: int = 1  # full finetuning on several devices shards weights, gradients and optimizer (FSDP)
    activation_checkpointing: bool = False  # keep only each Block's input; recompute the rest in the backward
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_dropout: float = 0.05
    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2
    quantize: str = "bnb.nf4-dq"  # QLoRA's 4-bit format (method "qlora" only)
    reference_forward: bool = False  # DPO (lit_lora/dpo.py): a forward pass with LoRA off per sequence, no grad

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"Unknown precision {self.precision!r}: choose one of {', '.join(PRECISION_BYTES)}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"Unknown quantization {self.quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        self.lora_targets = LoRAConfig(r=self.lora_r, dropout=self.lora_dropout, targets=self.lora_targets).targets

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")  # QLoRA trains the same A and B


# ---------------------------------------------------------------------------------------------------------
# Parameters


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer a LoRA target names (q..down in every Block; head once)."""
    C, kv_width = config.n_embd, config.n_query_groups * config.head_size
    I, V = config.intermediate_size, config.padded_vocab_size
    return {"q": (C, C), "k": (C, kv_width), "v": (C, kv_width), "o": (C, C),
            "gate": (C, I), "up": (C, I), "down": (I, C), "head": (C, V)}


def block_linear_parameters(config: Config) -> int:
    """Weights of one Block's seven linear layers: q, k, v, o, gate, up, down."""
    return sum(d_in * d_out for target, (d_in, d_out) in linear_shapes(config).items() if target != "head")


def block_parameters(config: Config) -> int:
    """Parameters of one Block: its linear layers and two RMSNorm weights."""
    return block_linear_parameters(config) + 2 * config.n_embd


def count_parameters(config: Config, setup: TrainingSetup) -> tuple[int, int]:
    """(trainable, total) parameters of the model that `setup.method` trains, by arithmetic."""
    shapes = linear_shapes(config)
    C, L = config.n_embd, config.n_layer
    if setup.method == "adapter" and setup.adapter_start_layer >= L:
        raise ValueError(f"adapter_start_layer ({setup.adapter_start_layer}) must be below the model's n_layer ({L})")
    embeddings = (1 if config.tie_embeddings else 2) * config.padded_vocab_size * C  # embed, lm_head: one if tied
    base = L * block_parameters(config) + embeddings + C  # + the final norm
    if setup.method == "full":
        return base, base
    if setup.uses_lora:  # A (r x d_in) and B (d_out x r) per targeted linear: r (d_in + d_out)
        added = sum(setup.lora_r * sum(shapes[target]) * (1 if target == "head" else L)
                    for target in setup.lora_targets)
    else:  # adapter: a prompt (K x C) and a gate per head in each layer from start_layer up
        added = (L - setup.adapter_start_layer) * (setup.adapter_prompt_length * C + config.n_head)
    return added, base + added


# ---------------------------------------------------------------------------------------------------------
# Activations: what autograd saves, module by module of model.py

FP32, INT64, BOOL = 4, 8, 1  # bytes per element of the tensors whose dtype the precision does not set


def saved_tensors(config: Config, setup: TrainingSetup) -> dict[str, int]:
    """Bytes of each tensor autograd keeps from one training forward (loss included) for the backward pass.

    With B x T = R rows, C = n_embd, I = intermediate_size, H = n_head, V = padded vocabulary, N = label
    positions, s = bytes per activation, a Block that trains everything saves (full finetuning):
        RMSNorm x 2      4RC (fp32 input) + 4R (1/rms) + sR C (normalised input, for the weight's gradient)
        q/k/v, gate/up   their shared input: sRC each
        attention        q, k, v (k and v repeated to H heads: sRC each), the output sRC, log-sum-exp 4BHT.
                         Flash / memory-efficient SDPA saves O(T) per query, never the T x T matrix
        o_proj           its input is the attention output, already saved
        MLP              gate output, silu output, up output, their product: 4 sRI
    i.e. (8 + 8s) RC + 4sRI + 8R + 4BHT per Block: 24 RC + 8 RI + ... bytes in bf16-true. What LoRA adds, and
    the head and loss save, is in `SavedTensors.linear` and `SavedTensors.llama`.
    Exact for 32-true and bf16-true: tests/test_compare.py checks it against what autograd saves for every
    preset family and method, so a change to model.py that changes what is saved fails there. Under autocast
    (the mixed precisions) some saved tensors have other dtypes: approximate.
    """
    return SavedTensors(config, setup).llama()


class SavedTensors:
    """model.py's training forward on paper, one method per module (named in its docstring), by autograd's rules:
    - an op saves what its backward needs, only for the inputs that need a gradient: y = x W^T saves x if W
      trains (dW = dy^T x) and W if x needs a gradient (dx = dy W; W is already counted as a weight);
    - an op none of whose inputs needs a gradient saves nothing: the layers below the first adapter layer,
      or LoRA's first RMSNorm (the frozen embedding's output needs no gradient);
    - a tensor saved by several ops is stored once: `saved` is keyed by tensor (Block i's under "blocks.i.").
    Each method takes whether its module's input needs a gradient and returns whether its output does. They
    come in model.py's order: RMSNorm, the linear layers (with LoRA: lora.py), attention, MLP, Block, LLaMA."""

    def __init__(self, config: Config, setup: TrainingSetup):
        self.config, self.setup = config, setup
        self.activation_bytes = PRECISION_BYTES[setup.precision][1]  # s
        self.rows = setup.micro_batch_size * setup.seq_length  # R = B x T
        self.base_trains = setup.method == "full"  # every weight of model.py trains
        self.lora_targets = set(setup.lora_targets) if setup.uses_lora else set()
        self.saved: dict[str, int] = {}

    def save(self, name: str, elements: int, bytes_per_element: Optional[int] = None) -> None:
        self.saved[name] = elements * (bytes_per_element or self.activation_bytes)  # an activation unless told

    def rms_norm(self, name: str, input_needs_grad: bool) -> bool:
        """`RMSNorm.forward`: x * rsqrt(mean(x^2) + eps) in fp32, then weight * x.to(dtype). The input's gradient
        needs the fp32 input and 1/rms; the weight's gradient needs the normalised input."""
        if input_needs_grad:
            self.save(name + ".input_fp32", self.rows * self.config.n_embd, FP32)
            self.save(name + ".rms", self.rows, FP32)
        if self.base_trains:
            self.save(name + ".normalized", self.rows * self.config.n_embd)
        return input_needs_grad or self.base_trains

    def linear(self, prefix: str, target: str, input_name: str, input_needs_grad: bool, rows: int) -> bool:
        """nn.Linear, y = x W^T, saves x if W trains. `LoRALinear.forward` adds scaling * B(A(dropout(x))), whose
        A and B train: it saves dropout(x) (x itself without dropout), the dropout mask where x needs a
        gradient (a bool on CUDA, in the activations' dtype on a CPU) and the r-wide middle, B's input."""
        input_elements = rows * linear_shapes(self.config)[target][0]  # rows x d_in
        if self.base_trains:
            self.save(prefix + input_name, input_elements)
        if target in self.lora_targets:
            module = prefix + LORA_TARGETS[target]  # e.g. blocks.0.attn.q_proj
            if self.setup.lora_dropout > 0:
                self.save(module + ".dropout_output", input_elements)
                if input_needs_grad:
                    self.save(module + ".dropout_mask", input_elements, BOOL if self.setup.device == "cuda" else None)
            else:
                self.save(prefix + input_name, input_elements)
            self.save(module + ".lora_middle", rows * self.setup.lora_r)
        return input_needs_grad or self.base_trains or target in self.lora_targets

    def attention(self, prefix: str, input_needs_grad: bool, adapted: bool) -> bool:
        """`CausalSelfAttention.forward`: q, k, v of the normalised input, RoPE (which saves only its cos/sin
        buffers), `attend`, o_proj. In the adapted layers, `AdapterAttention.attend` adds the prompt's attention."""
        qkv_need_grad = [self.linear(prefix, target, "attn_norm.output", input_needs_grad, self.rows)
                         for target in ("q", "k", "v")]
        if any(qkv_need_grad):  # `attend` over the sequence: k and v after repeat_kv, H heads each
            self.scaled_dot_product_attention(prefix, "", self.rows)
        if adapted:  # softmax(q prompt_k^T / sqrt(hs)) prompt_v, gated: the prompt trains, so this kernel saves too;
            # the K prompt keys and values are shared by the batch, and the gate's product saves the kernel's output
            self.scaled_dot_product_attention(prefix, "prompt_", self.setup.adapter_prompt_length)
        # The kernel writes its output as (B, T, H, hs), so attend's transpose + reshape is a view: o_proj's input
        # is the tensor the kernel saved. The adapter's y + gate * prompt_y is a new tensor.
        o_proj_input = "attention_mixed" if adapted else "attention_output"
        return self.linear(prefix, "o", o_proj_input, any(qkv_need_grad) or adapted, self.rows)

    def scaled_dot_product_attention(self, prefix: str, source: str, key_rows: int) -> None:
        """F.scaled_dot_product_attention saves q (R x C), k and v (key_rows x C each), its output (R x C) and the
        fp32 log-sum-exp of each query and head (B x H x T). source: "" the sequence's keys, "prompt_" the prompt's."""
        self.save(prefix + "q", self.rows * self.config.n_embd)  # the same q for the prompt's kernel: stored once
        self.save(prefix + source + "k", key_rows * self.config.n_embd)
        self.save(prefix + source + "v", key_rows * self.config.n_embd)
        self.save(prefix + source + "attention_output", self.rows * self.config.n_embd)
        self.save(prefix + source + "attention_lse", self.rows * self.config.n_head, FP32)

    def mlp(self, prefix: str, input_needs_grad: bool) -> bool:
        """`MLP.forward`: down(silu(gate(x)) * up(x))."""
        gate_needs_grad = self.linear(prefix, "gate", "mlp_norm.output", input_needs_grad, self.rows)
        up_needs_grad = self.linear(prefix, "up", "mlp_norm.output", input_needs_grad, self.rows)
        hidden_elements = self.rows * self.config.intermediate_size  # R x I
        if gate_needs_grad:
            self.save(prefix + "gate_output", hidden_elements)  # silu's input
            self.save(prefix + "up_output", hidden_elements)  # the product's gradient with respect to silu(gate)
        if up_needs_grad:
            self.save(prefix + "silu_output", hidden_elements)  # the product's gradient with respect to up
        return self.linear(prefix, "down", "mlp_product", gate_needs_grad or up_needs_grad, self.rows)

    def block(self, index: int, input_needs_grad: bool) -> bool:
        """`Block.forward`: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)). The additions save nothing."""
        prefix = f"blocks.{index}."
        adapted = self.setup.method == "adapter" and index >= self.setup.adapter_start_layer
        attention_needs_grad = self.attention(prefix, self.rms_norm(prefix + "attn_norm", input_needs_grad), adapted)
        needs_grad = input_needs_grad or attention_needs_grad
        return self.mlp(prefix, self.rms_norm(prefix + "mlp_norm", needs_grad)) or needs_grad

    def llama(self) -> dict[str, int]:
        """`LLaMA.forward`, then train.loss_sum: the cross-entropy of the logits at the N label positions."""
        label_rows = round(self.rows * self.setup.label_fraction)  # N
        needs_grad = self.base_trains  # the embedding's output needs a gradient only if the embedding trains
        if self.base_trains:
            self.save("embed.token_ids", self.rows, INT64)
        for index in range(self.config.n_layer):
            needs_grad = self.block(index, needs_grad)
        needs_grad = self.rms_norm("norm", needs_grad)
        if needs_grad:
            self.save("logits_at", self.rows, BOOL)  # x[logits_at] saves the (B, T) mask
        self.linear("", "head", "lm_head.input", needs_grad, label_rows)
        self.save("loss.log_probs", label_rows * self.config.padded_vocab_size, FP32)  # log_softmax's output
        self.save("loss.targets", label_rows, INT64)
        self.save("loss.total_weight", 1, FP32)  # nll_loss's normaliser
        return self.saved


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
    parameter_bytes, activation_bytes = PRECISION_BYTES[setup.precision]
    trainable, total = count_parameters(config, setup)
    weights, gradients = total * parameter_bytes, trainable * parameter_bytes
    if setup.method == "qlora":  # the Blocks' linear weights in 4 bits instead of the parameter dtype
        in_4bit = config.n_layer * block_linear_parameters(config)
        weights += round(in_4bit * NF4_BYTES[setup.quantize]) - in_4bit * parameter_bytes
    optimizer = 2 * trainable * parameter_bytes  # AdamW's m and v
    if setup.device == "cuda":  # multi-tensor AdamW: sqrt(v) for all trainable tensors at once
        scratch = trainable * parameter_bytes
    else:  # one tensor at a time: sqrt(v), then sqrt(v) / bias correction, of the largest tensor
        scratch = 2 * largest_trainable_tensor(config, setup) * parameter_bytes
    if setup.method == "full" and setup.devices > 1:
        # FSDP: every device keeps 1/devices of the weights, gradients and moments. On top of the shards: the
        # Block it computes, its weights gathered whole and, in its backward, its whole gradients until they are
        # reduce-scattered into the shards (after every micro batch: the gradients stay sharded)
        block_bytes = block_parameters(config) * parameter_bytes
        weights = weights // setup.devices + block_bytes
        gradients = gradients // setup.devices + block_bytes
        optimizer //= setup.devices
        scratch //= setup.devices

    saved = saved_tensors(config, setup)
    log_probs = saved["loss.log_probs"]  # counted with the logits
    if setup.activation_checkpointing:  # each Block's input, plus one Block's tensors while it is recomputed
        per_block = [sum(size for name, size in saved.items() if name.startswith(f"blocks.{index}."))
                     for index in range(config.n_layer)]
        outside_blocks = sum(size for name, size in saved.items() if not name.startswith("blocks."))
        block_inputs = config.n_layer * setup.micro_batch_size * setup.seq_length * config.n_embd * activation_bytes
        activations = block_inputs + max(per_block, default=0) + outside_blocks - log_probs
    else:
        activations = sum(saved.values()) - log_probs
    if parameter_bytes != activation_bytes:  # autocast (approximate): each linear weight's 16-bit copy is saved
        blocks = 0 if setup.method == "qlora" else config.n_layer * block_linear_parameters(config)  # not the 4-bit
        activations += activation_bytes * (blocks + config.n_embd * config.padded_vocab_size)
    return MemoryEstimate(setup, trainable, total, weights, gradients, optimizer, activations, 3 * log_probs,
                          scratch, saved)


def largest_trainable_tensor(config: Config, setup: TrainingSetup) -> int:
    shapes = linear_shapes(config)
    if setup.method == "full":
        return max(d_in * d_out for d_in, d_out in shapes.values())  # the embedding / lm_head
    if setup.uses_lora:
        return max(setup.lora_r * max(shapes[target]) for target in setup.lora_targets)
    return setup.adapter_prompt_length * config.n_embd


def format_estimates(estimates: dict[str, MemoryEstimate]) -> str:
    """A Markdown table: one row per part of the memory, one column per estimate."""
    names = list(estimates)
    header = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    lines = []
    first = next(iter(estimates.values()))
    for part in first.parts():
        cells = [format_bytes(estimate.parts()[part]) for estimate in estimates.values()]
        label = f"**{part}**" if part == "total" else part
        lines.append(f"| {label} | " + " | ".join(f"**{cell}**" if part == "total" else cell for cell in cells) + " |")
    trainable = [f"{e.trainable_parameters:,} ({100 * e.trainable_parameters / e.total_parameters:.2f}%)"
                 for e in estimates.values()]
    lines.insert(0, "| trainable parameters | " + " | ".join(trainable) + " |")
    return header + "\n".join(lines)
