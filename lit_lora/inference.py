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
  sum of elementwise products, y_j = sum_i x_i W_ji, which torch's compiler (inductor) turns into one loop that
  streams W once. No matrix-multiply library call is involved: the compiler writes the loop, vectorized for the
  CPU it runs on. The step is compiled ahead of time, once, and kept on disk for every later run.

RoPE and RMSNorm take fewer operations as well (below). What all this gains, measured against Hugging Face, against
llama.cpp and against the memory-bandwidth bound, is printed by benchmarks/generate_throughput.py and
benchmarks/real_model_decode.py (howto/generate.md, "Speed"). Training never uses this layout (LoRA and the adapter
need the modules of model.py), so it is applied only where a model is prepared for generation, after LoRA is
merged (a merged LoRA layer is a plain x W^T again).
"""

import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from operator import attrgetter
from pathlib import Path

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


class CompiledStep:
    """The one-token decoding step compiled ahead of time for one shape (batch size, KV cache length, dtype), kept
    on disk and loaded by later runs; see compile_decoding."""

    def __init__(self, package, step: "DecodingStep"):
        self.package, self.step, self.bound_to = package, step, None

    def bind(self) -> None:
        """Point the package at the model's weights and KV cache (no copy: it reads them where they are)."""
        named = {name: attrgetter(name)(self.step) for name in self.package.get_constant_fqns()}  # "model.embed.weight", ...
        self.package.load_constants(named, False, True, True, False)  # the active set, all of them, user-managed, no copy
        self.bound_to = self.step.model.blocks[0].attn.kv_cache

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.bound_to is not self.step.model.blocks[0].attn.kv_cache:  # a new KV cache (set_kv_cache)
            self.bind()
        (logits,) = self.package.run([idx, input_pos])
        return logits


class DecodingStep(nn.Module):
    """What is exported: the model's own forward for one new token, with a KV cache."""

    def __init__(self, model: LLaMA, forward):
        super().__init__()
        self.model, self.forward_of_model = model, forward

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.forward_of_model(idx, input_pos),)


def compile_decoding(model: LLaMA) -> LLaMA:
    """Decode with the one-token step compiled ahead of time, in place; the prefill stays eager. Fuse the model with
    fuse_for_inference(model, for_compile=True) first: its products of one row then compile into loops over the
    weights (matvec) rather than calls to the matrix-multiply library.

    A decoding step has the same shapes at every token (the new token (B, 1), the KV cache), so one compiled step
    serves them all. torch.export traces it into a graph, and AOTInductor turns the graph into C++ and compiles that
    into a shared library, packaged in a .pt2 file that the next run loads in a moment, with no Python between the
    operations of a step. The weights and the KV cache are not inside it: they are named inputs the package is
    pointed at when it is loaded (user-managed constants), so one package serves every model of the same shapes
    (the base model and each of its finetunes) and the eager prefill fills the same KV cache the step reads.

    Packages are kept in the cache folder (LIT_LORA_CACHE, else ~/.cache/lit_lora), one folder per key: the torch
    version, the CPU, the device, the model's config, the name, shape and dtype of every weight and buffer (the KV
    cache's among them: batch size and length), the inputs' shapes and a hash of the code that is traced. The key
    is written beside the package and compared on load. Where no package exists one is compiled (seconds to
    minutes, added to model.compile_seconds so callers can report it apart from decoding); where compiling or
    saving fails, that shape decodes eagerly, said once."""
    eager = model.forward
    steps = {}  # shapes -> CompiledStep, or None: eager

    def step_for(idx: torch.Tensor, input_pos: torch.Tensor):
        shapes = (idx.shape, idx.dtype, input_pos.shape, input_pos.dtype, model.blocks[0].attn.kv_cache.k.shape)
        if shapes not in steps:
            steps[shapes] = compiled_step(model, eager, idx, input_pos)
        return steps[shapes]

    def forward(idx: torch.Tensor, input_pos=None, logits_at=None) -> torch.Tensor:
        if input_pos is None or idx.size(1) != 1 or logits_at is not None:
            return eager(idx, input_pos, logits_at)  # the prefill, or a plain forward
        step = step_for(idx, input_pos)
        return eager(idx, input_pos) if step is None else step(idx, input_pos)

    def prepare_decoding_step(batch_size: int) -> float:
        """Load or compile the step for the KV cache set now, before the prefill rather than at the first step;
        the seconds spent compiling it (0 when it was kept)."""
        token, position = (torch.zeros(batch_size, 1, dtype=torch.long, device=model.lm_head.weight.device)
                           for _ in range(2))  # as generate_stream's; two tensors: an export of one would alias them
        compiled_before = model.compile_seconds
        step_for(token, position)
        return model.compile_seconds - compiled_before

    model.forward = forward  # this model only (instance attributes): nn.Module.__call__ calls it
    model.prepare_decoding_step, model.compile_seconds = prepare_decoding_step, 0.0
    return model


AUTO_COMPILE_PARAMETERS = 50_000_000  # --compile auto compiles a step for a model at least this large


def worth_compiling(model: LLaMA) -> bool:
    """--compile auto: whether to decode with a compiled step at all. Compiling costs about the same for any size
    (most of it is the C++ compiler's fixed work), while the time it saves per token grows with the model: below
    AUTO_COMPILE_PARAMETERS a token takes milliseconds eagerly, and a compilation would pay only after many
    thousands of tokens."""
    return sum(p.numel() for p in model.parameters()) >= AUTO_COMPILE_PARAMETERS


def cache_folder() -> Path:
    """Where compiled decoding steps are kept: $LIT_LORA_CACHE, else $XDG_CACHE_HOME/lit_lora, else ~/.cache/lit_lora."""
    if os.environ.get("LIT_LORA_CACHE"):
        return Path(os.environ["LIT_LORA_CACHE"]) / "decoding"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_lora" / "decoding"


def decoding_key(model: LLaMA, idx: torch.Tensor, input_pos: torch.Tensor) -> dict:
    """Everything a compiled step depends on: what it was compiled for (torch, the CPU or GPU), the computation
    (the config, the module types, the traced code) and its inputs (every tensor's name, shape and dtype)."""
    device = idx.device
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        processor = f"{names[0] if names else platform.processor()}, {torch.backends.cpu.get_cpu_capability()}"
    config = {k: v for k, v in asdict(model.config).items() if k not in ("name", "extra")}
    modules = {type(module) for module in model.modules()}
    sources = sorted({inspect.getsourcefile(cls) for cls in modules if cls.__module__.startswith("lit_lora")})
    code = hashlib.sha256(b"".join(Path(source).read_bytes() for source in sources + [__file__]))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers()), "cos": model.cos, "sin": model.sin}
    return {"format": 1, "torch": torch.__version__, "machine": platform.machine(), "device": device.type,
            "processor": processor, "config": config, "code": code.hexdigest(),
            "modules": sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in modules),
            "inputs": [[list(t.shape), str(t.dtype)] for t in (idx, input_pos)],
            "tensors": {name: [list(t.shape), str(t.dtype)] for name, t in tensors.items()}}


def compiled_step(model: LLaMA, eager, idx: torch.Tensor, input_pos: torch.Tensor):
    """The compiled step for these shapes: loaded from the cache folder, else built and saved there; None where it
    cannot be built: decode eagerly."""
    key = decoding_key(model, idx, input_pos)
    text = json.dumps(key, sort_keys=True, indent=1)
    folder = cache_folder() / hashlib.sha256(text.encode()).hexdigest()[:24]
    shape = f"batch {idx.size(0)}, {model.blocks[0].attn.kv_cache.k.size(2)} positions, {model.lm_head.weight.dtype}"
    if folder.exists():
        try:
            if (folder / "key.json").read_text() != text:
                raise ValueError("its key.json is not this model's key")
            start = time.perf_counter()
            step = CompiledStep(load_package(folder / "step.pt2"), DecodingStep(model, eager))
            step.bind()  # every weight and buffer it names, with its shape: what a damaged package fails
            print(f"Decoding with the compiled step for {shape} from {folder} (loaded in "
                  f"{time.perf_counter() - start:.2f} s)", file=sys.stderr)
            return step
        except Exception as error:  # damaged, truncated, or not what it claims: never used, rebuilt
            print(f"Warning: the compiled decoding step in {folder} cannot be used ({first_line(error)}); "
                  "compiling it again.", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    print(f"Compiling the decoding step for {shape}, once for this model's shapes, this torch and this "
          f"{key['device'].upper()}; later runs load it from {folder.parent} (--compile false skips it)...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        step = DecodingStep(model, eager)
        package = build_package(step, idx, input_pos, folder, text)
    except Exception as error:  # no C++ compiler, a full disk, an operation AOTInductor cannot compile, ...
        print(f"Warning: could not compile the decoding step ({first_line(error)}); decoding eagerly (slower).",
              file=sys.stderr)
        return None
    finally:
        model.compile_seconds += time.perf_counter() - start
    return CompiledStep(package, step)


def build_package(step: DecodingStep, idx: torch.Tensor, input_pos: torch.Tensor, folder: Path, key: str):
    """Export and compile `step`, save it as folder/step.pt2 with folder/key.json, and load it. Written into a
    temporary folder renamed into place at the end: an interrupted or failed build leaves nothing behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with torch.no_grad():
            program = torch.export.export(step, (idx, input_pos), strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(temporary / "step.pt2"),
                                                     inductor_configs={"aot_inductor.package_constants_in_so": False})
        (temporary / "key.json").write_text(key)
        try:
            temporary.rename(folder)
        except OSError:  # another run saved the same step meanwhile: keep theirs
            if not (folder / "key.json").exists():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return load_package(folder / "step.pt2")


def load_package(path: Path):
    """The compiled step in a .pt2 file, loaded by torch's C++ loader (what torch._inductor.aoti_load_package
    wraps, without importing torch._inductor: seconds of Python imports a run that compiles nothing never needs)."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)  # one runner, on the CPU


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
