"""What the benchmark scripts share: their fixed CPU model, LLaMA's shape at 8 layers of width 512 (8 heads, the
32,000-token vocabulary), 60M parameters (not a published model, so not among lit_lora/model.py's presets); and
what tells a figure measured on a busy machine from one measured on a quiet one; and the measurements the decoding
benchmarks share (the bandwidth, the best of repeats, Hugging Face's generate on the same weights); and the real
model they measure, SmolLM2-135M-Instruct, made from the GGUF file checkpoints/fetch_smollm2_gguf.py brings."""

import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_lora.chat import time_tokens
from lit_lora.generation import generate_stream
from lit_lora.model import Config, LLaMA


SMOLLM2_GGUF = Path(__file__).resolve().parents[1] / "checkpoints/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint(checkpoint_dir: Path) -> Path:
    """checkpoint_dir, converted to lit-lora's fp32 checkpoint from the fetched GGUF file when it is not there yet."""
    from lit_lora.convert.gguf import convert_gguf_checkpoint

    if not (Path(checkpoint_dir) / "lit_model.pth").is_file():
        if not SMOLLM2_GGUF.is_file():
            sys.exit(f"error: {SMOLLM2_GGUF} is not here: run python checkpoints/fetch_smollm2_gguf.py")
        convert_gguf_checkpoint(SMOLLM2_GGUF, checkpoint_dir)
    return Path(checkpoint_dir)


def bench_config() -> Config:
    return Config(name="bench-8x512", block_size=256, n_layer=8, n_head=8, n_embd=512)


def machine_load() -> str:
    """The load average at the start of a benchmark, with a warning where it is not well under 1: on a busy machine
    the figures mean little (on 2 cores, a parallel job made identical runs many times slower)."""
    if not hasattr(os, "getloadavg"):
        return "load average: unknown on this system"
    load = os.getloadavg()[0]
    line = f"load average at the start: {load:.2f} on {os.cpu_count()} cores"
    if load >= 0.5:
        line += " -- WARNING: not a quiet machine; the figures below may be far off. Measure again when it is quiet."
    return line


def spread_warning(name: str, times: list[float], limit: float = 0.2) -> str:
    """A warning when the repeats of one measurement disagree by more than `limit` (slowest / fastest - 1): the
    machine was busy meanwhile, and the best figure may be luck. "" when they agree."""
    spread = max(times) / min(times) - 1
    if spread <= limit:
        return ""
    return f"WARNING: the repeats of {name} disagree by {100 * spread:.0f}% (more than {100 * limit:.0f}%): busy machine?"


def sum_bandwidth(tensors: list[torch.Tensor], repeats: int = 10) -> float:
    """Bytes per second of reading `tensors` one after another (a sum over each; best of `repeats`)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for tensor in tensors:
                tensor.sum()
            best = min(best, time.perf_counter() - start)
    return total / best


def read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second that a matrix-vector product streams from memory (best of `repeats`)."""
    rows = megabytes * 2**20 // 4 // 4096
    matrix, vector = torch.randn(rows, 4096), torch.randn(4096)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best


def memory_reads(weights: list[torch.Tensor], what: str, own: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Bytes per second of the reads of memory measured here: one large matrix-vector product, the caller's `own`
    reads (listed next), a plain sum over one 512 MB tensor, and a sum over each of `weights` in turn (named `what`).
    A decoding benchmark takes the fastest as the bandwidth of its bound."""
    return {"one large matrix-vector product": read_bandwidth(), **(own or {}),
            "a sum over one 512 MB tensor": sum_bandwidth([torch.randn(128 * 2**20)]),
            f"a sum over each of {what}": sum_bandwidth(weights)}


def bytes_per_token(model: LLaMA, prompt_length: int, new_tokens: int) -> float:
    """Bytes a batch-1 decoding step reads, on average over `new_tokens` steps after a `prompt_length` prompt: every
    weight once (a tied matrix once, as the lm_head; of an untied embedding table only the token's row) and the KV
    cache written so far (half the new tokens, on average)."""
    config, embed = model.config, model.embed.weight
    weights = {p.data_ptr(): p for p in model.parameters()}.values()  # a tied matrix once
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    if not config.tie_embeddings:
        weight_bytes -= (embed.numel() - config.n_embd) * embed.element_size()
    kv_values = config.n_layer * 2 * (prompt_length + new_tokens / 2) * config.n_query_groups * config.head_size
    return weight_bytes + kv_values * embed.element_size()  # the KV cache is kept in the weights' dtype


WARNINGS: list[str] = []  # repeats that disagreed, said again at the end


def best_time(fn, repeats: int, name: str = "a measurement") -> tuple[float, object]:
    """The shortest of `repeats` runs of fn (after one run to warm up), and fn's result. Under inference_mode, as
    the generate scripts decode (and as HF's generate does). Repeats that disagree are noted in WARNINGS."""
    with torch.inference_mode():
        result = fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
    warning = spread_warning(name, times)
    if warning:
        print(f"  {warning}")
        WARNINGS.append(warning)
    return min(times), result


def decode_rate(model: LLaMA, prompt: torch.Tensor, new_tokens: int, repeats: int,
                kv_length: Optional[int] = None) -> float:
    """Tokens/s of the decoding steps alone (after the first token, which waits for the prefill), as the generate
    scripts report them: the figure to hold against the bound, which is the cost of one decoding step. The KV
    cache holds `kv_length` positions (default: the prompt and the new tokens)."""
    best = 0.0
    for _ in range(repeats + 1):
        model.set_kv_cache(batch_size=1, max_seq_length=kv_length or len(prompt) + new_tokens)
        times = []  # when each token was ready, as the generate scripts note them
        with torch.inference_mode():
            list(time_tokens(generate_stream(model, [prompt], new_tokens), times))
        model.clear_kv_cache()
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    return best


def hugging_face_model(model: LLaMA):
    """The same weights in transformers' LlamaForCausalLM (SDPA attention), or None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from lit_lora.convert.hf import config_to_hf, lit_to_hf_name
    except ImportError:
        print("  (transformers is not installed: pip install -e '.[test]' to compare with Hugging Face)")
        return None
    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(model.config).items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict({lit_to_hf_name(k): v for k, v in model.state_dict().items()})
    return hf


def hf_generate(hf, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """HF `generate`, greedy, exactly `new_tokens` tokens per prompt; a batch is padded on the left with a mask."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):], mask[row, length - len(prompt):] = prompt, 1
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    return list(out[:, length:])


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
