"""Batch-1 decoding speed on a fixed CPU configuration: lit-lora against Hugging Face `generate` on the same
weights, and against the memory-bandwidth bound.

    python benchmarks/generate_throughput.py

The configuration: `bench-8x512` (benchmarks/bench_config.py: 8 layers, n_embd 512, 8 heads, vocab 32000), fp32, a prompt of
32 tokens, 128 new tokens, greedy. Both implementations must produce the same tokens.

The bound. At batch size 1 a decode step multiplies every weight matrix by one vector: each weight is read
from memory once and used for one multiply-add, so the step takes at least (bytes read) / (memory bandwidth).
Bytes read per token: every parameter except the embedding table (only one row of it is read), plus the KV
cache. The bandwidth is measured here, with the same kind of work: matrix-vector products over a matrix far
larger than the CPU caches.
"""

import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_lora.generation import generate  # noqa: E402
from lit_lora.inference import fuse_for_inference  # noqa: E402
from lit_lora.model import LLaMA  # noqa: E402
from benchmarks.bench_config import bench_config  # noqa: E402
from lit_lora.utils import cli  # noqa: E402


def read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second that matrix-vector products stream from memory (best of `repeats`)."""
    rows = megabytes * 2**20 // 4 // 4096
    matrix, vector = torch.randn(rows, 4096), torch.randn(4096)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best


def time_it(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(prompt_length: int = 32, new_tokens: int = 128, repeats: int = 3) -> dict:
    """Measure decoding tokens/s.

    Args:
        prompt_length: Tokens in the (random) prompt.
        new_tokens: Tokens to generate (no EOS: always this many).
        repeats: Runs of each; the best is reported.
    """
    torch.manual_seed(0)
    config = bench_config()
    model = LLaMA(config).eval()
    prompt = torch.randint(0, config.vocab_size, (prompt_length,))

    fused = fuse_for_inference(copy.deepcopy(model))  # as the generate scripts decode (--fused true, the default)
    timings = {}
    for name, decoder in (("plain", model), ("fused", fused)):
        generate(decoder, [prompt], max_new_tokens=8)  # warm up
        timings[name] = time_it(lambda: generate(decoder, [prompt], max_new_tokens=new_tokens), repeats)
    (plain_s, (plain_tokens,)), (lit_s, (lit_tokens,)) = timings["plain"], timings["fused"]
    assert torch.equal(plain_tokens, lit_tokens), "the fused layout must decode the same tokens"
    figures = {"lit_tokens_per_s": new_tokens / lit_s, "plain_tokens_per_s": new_tokens / plain_s}

    n_params = sum(p.numel() for p in model.parameters())
    kv_bytes = config.n_layer * 2 * (prompt_length + new_tokens / 2) * config.n_query_groups * config.head_size * 4
    bytes_per_token = (n_params - model.embed.weight.numel() + config.n_embd) * 4 + kv_bytes
    bandwidth = read_bandwidth()
    bound = bandwidth / bytes_per_token
    figures.update(bandwidth_gb_s=bandwidth / 1e9, bound_tokens_per_s=bound, fraction_of_bound=figures["lit_tokens_per_s"] / bound)

    print(f"Decoding, bench-8x512 ({n_params / 1e6:.0f}M parameters), fp32, batch 1, {prompt_length}-token prompt, "
          f"{new_tokens} new tokens, {torch.get_num_threads()} threads (best of {repeats}):")
    print(f"  lit-lora           {figures['lit_tokens_per_s']:7.1f} tokens/s   (fused layout; model.py's plain layers: "
          f"{figures['plain_tokens_per_s']:.1f}, the same tokens)")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from lit_lora.convert_hf import config_to_hf, lit_to_hf_name
    except ImportError:
        print("  (transformers is not installed: pip install -e '.[test]' to compare with Hugging Face)")
    else:
        hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
        hf_config._attn_implementation = "sdpa"
        hf = LlamaForCausalLM(hf_config).eval()
        hf.load_state_dict({lit_to_hf_name(k): v for k, v in model.state_dict().items()})
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                       pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            hf.generate(prompt.unsqueeze(0), **{**options, "max_new_tokens": 8, "min_new_tokens": 8})  # warm up
            hf_s, hf_out = time_it(lambda: hf.generate(prompt.unsqueeze(0), **options), repeats)
        same = torch.equal(hf_out[0, prompt_length:], lit_tokens)
        figures.update(hf_tokens_per_s=new_tokens / hf_s, ratio=hf_s / lit_s, same_tokens=same)
        print(f"  Hugging Face       {figures['hf_tokens_per_s']:7.1f} tokens/s   (same tokens: {same})")
        print(f"  ratio lit-lora / Hugging Face: {figures['ratio']:.2f}x (target >= 1.3x)")
    print(f"  bandwidth bound    {bound:7.1f} tokens/s   ({bytes_per_token / 1e6:.0f} MB read per token at "
          f"{bandwidth / 1e9:.1f} GB/s measured); lit-lora reaches {100 * figures['fraction_of_bound']:.0f}% of it (aim: 75%)")
    return figures


if __name__ == "__main__":
    cli(main)
