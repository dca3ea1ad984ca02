"""Decoding speed on a fixed CPU configuration: lit-lora against Hugging Face `generate` on the same weights, and
against the memory-bandwidth bound.

    python benchmarks/generate_throughput.py              # about 3 minutes on 2 cores, compilation included
    python benchmarks/generate_throughput.py --compile false

The configuration: `bench-8x512` (benchmarks/bench_config.py: 8 layers, n_embd 512, 8 heads, vocab 32000), fp32,
greedy, no stop token (always `new_tokens` tokens), random weights. Each implementation must produce the same tokens.
Five measurements, each the best of `repeats` runs:

1. Batch 1: a 32-token prompt, 128 new tokens. model.py's layers as they are ("plain"), the fused layout the generate
   scripts use (lit_lora/inference.py), a LoRA (r 8 on q and v) merged into the weights and left unmerged, and HF.
2. The bound. At batch size 1 a decode step multiplies every weight matrix by one vector: each weight is read from
   memory once and used for one multiply-add, so a step takes at least (bytes read) / (memory bandwidth). Bytes read
   per token: every parameter except the embedding table (one row of it is read), plus the KV cache. The bandwidth is
   the fastest of four reads measured here: a matrix-vector product over a matrix far larger than the CPU caches,
   the model's own 33 weight products of a step timed alone (these can stream faster than the one large product),
   and plain reads (a sum) of one 512 MB tensor and of the 33 weights (on some CPUs torch's products stream at half
   the memory's rate, and a compiled step beat a bound taken from them). Against it: the decoding steps alone
   (after the first token, which waits for the prefill), as the generate scripts report them.
3. --compile: the time compiling the decoding step ahead of time takes (a first compilation: inductor's on-disk
   cache is off here and lit-lora's is an empty folder; benchmarks/real_model_decode.py measures a later run's
   too), apart from the decoding speed after it.
4. Batched: 8 prompts of different lengths at once (lit-lora pads on the right and keeps each row's positions;
   HF pads on the left with an attention mask), tokens/s counted over all rows.
5. Prefill: the time to the first token of a 512-token prompt.
"""

import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # time a first compilation, not one read from disk
os.environ["LIT_LORA_CACHE"] = tempfile.mkdtemp(prefix="lit-lora-cache-")  # and no compiled step kept from before
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import (  # noqa: E402
    WARNINGS,
    bench_config,
    best_time,
    bytes_per_token,
    decode_rate,
    hf_generate,
    hugging_face_model,
    machine_load,
    memory_reads,
    same,
)
from lit_lora.cli import cli  # noqa: E402
from lit_lora.generation import generate  # noqa: E402
from lit_lora.inference import compile_decoding, fuse_for_inference  # noqa: E402
from lit_lora.lora import apply_lora, merge_lora  # noqa: E402
from lit_lora.model import LLaMA  # noqa: E402


def matrix_products_of_a_step(fused: LLaMA) -> None:
    """Only the weight products of one batch-1 decoding step of a fused model: what a step costs at the least."""
    x = torch.zeros(1, 1, fused.config.n_embd)
    hidden = torch.zeros(1, 1, fused.config.intermediate_size)
    for block in fused.blocks:
        block.attn.qkv(x), block.attn.o(x), block.mlp.gate_up(x), block.mlp.down(hidden)
    fused.lm_head(x)


def main(prompt_length: int = 32, new_tokens: int = 128, batch_size: int = 8, prefill_length: int = 512,
         repeats: int = 3, compile: bool = True) -> dict:
    """Measure decoding tokens/s and time to first token.

    Args:
        prompt_length: Tokens in the (random) prompt of the batch-1 runs; the batched prompts range around it.
        new_tokens: Tokens to generate (no EOS: always this many).
        batch_size: Prompts in the batched run.
        prefill_length: Tokens in the prompt whose time to first token is measured.
        repeats: Runs of each; the best is reported.
        compile: Also measure the compiled decoding step (--compile true): compilation takes about a minute.
    """
    torch.manual_seed(0)
    config = dataclasses.replace(bench_config(), block_size=1024)  # room for the prefill prompt
    model = LLaMA(config).eval()
    fused = fuse_for_inference(copy.deepcopy(model))  # as the generate scripts decode (--fused true, the default)
    lora = apply_lora(copy.deepcopy(model), r=8, alpha=16, targets=("q", "v")).eval()
    with torch.no_grad():  # a trained LoRA: B is not zero
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    lora_unmerged = fuse_for_inference(copy.deepcopy(lora))  # unmerged LoRA layers stay unfused
    lora_merged = copy.deepcopy(lora)
    merge_lora(lora_merged)  # what generate/lora.py does
    fuse_for_inference(lora_merged)
    prompt = torch.randint(0, config.vocab_size, (prompt_length,))
    figures = {}
    print(f"Decoding, bench-8x512 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), fp32, "
          f"{torch.get_num_threads()} threads, best of {repeats}; {machine_load()}")

    # 1. batch 1
    print(f"\n1. Batch 1: a {prompt_length}-token prompt, {new_tokens} new tokens")
    runs = {}
    for name, decoder in (("plain", model), ("fused", fused), ("lora_merged", lora_merged),
                          ("lora_unmerged", lora_unmerged)):
        runs[name] = best_time(lambda: generate(decoder, [prompt], max_new_tokens=new_tokens), repeats, name)
        figures[f"{name}_tokens_per_s"] = new_tokens / runs[name][0]
    tokens = runs["fused"][1]
    assert same(runs["plain"][1], tokens), "the fused layout must decode the same tokens"
    lit = figures["fused_tokens_per_s"]
    print(f"  lit-lora           {lit:7.1f} tokens/s   (the fused layout of the generate scripts)")
    print(f"  model.py's layers  {figures['plain_tokens_per_s']:7.1f} tokens/s   (--fused false; the same tokens)")
    print(f"  LoRA merged        {figures['lora_merged_tokens_per_s']:7.1f} tokens/s   (generate/lora.py: the base "
          f"model's speed)")
    unmerged_cost = figures["lora_merged_tokens_per_s"] / figures["lora_unmerged_tokens_per_s"]
    print(f"  LoRA unmerged      {figures['lora_unmerged_tokens_per_s']:7.1f} tokens/s   (r 8 on q and v, attention "
          f"unfused: {100 * (unmerged_cost - 1):.0f}% more time per token than merged)")
    hf = hugging_face_model(model)
    if hf is not None:
        hf_s, hf_tokens = best_time(lambda: hf_generate(hf, [prompt], new_tokens), repeats, "Hugging Face")
        figures.update(hf_tokens_per_s=new_tokens / hf_s, ratio=lit / (new_tokens / hf_s))
        print(f"  Hugging Face       {figures['hf_tokens_per_s']:7.1f} tokens/s   (same tokens: {same(hf_tokens, tokens)})")
        print(f"  lit-lora / Hugging Face: {figures['ratio']:.2f}x (target >= 1.3x)")

    # 2. the bound
    read_per_token = bytes_per_token(model, prompt_length, new_tokens)
    products_s, _ = best_time(lambda: [matrix_products_of_a_step(fused) for _ in range(new_tokens)], repeats,
                               "the weight products")
    product_weights = [p for n, p in fused.named_parameters() if n.endswith("stored")]  # the 33 weights
    product_bytes = sum(p.numel() * p.element_size() for p in product_weights)
    reads = memory_reads(product_weights, "the 33 weights", own={
        "the fused model's 33 weight products of a step alone, in a loop": product_bytes * new_tokens / products_s})
    bandwidth = max(reads.values())  # the fastest: the strictest bound
    bound = bandwidth / read_per_token
    decoding = decode_rate(fused, prompt, new_tokens, repeats)
    figures.update(bandwidth_gb_s=bandwidth / 1e9, reads_gb_s={k: v / 1e9 for k, v in reads.items()},
                   bound_tokens_per_s=bound, decoding_tokens_per_s=decoding, fraction_of_bound=decoding / bound)
    print(f"\n2. Bandwidth bound  {bound:7.1f} tokens/s   ({read_per_token / 1e6:.0f} MB read per token at "
          f"{bandwidth / 1e9:.1f} GB/s, the fastest of: "
          + ", ".join(f"{name} {speed / 1e9:.1f} GB/s" for name, speed in reads.items()) + ")")
    print(f"  decoding steps     {decoding:7.1f} tokens/s   (lit-lora after the first token, the prefill excluded: "
          f"{100 * decoding / bound:.0f}% of the bound; target 75%)")

    # 3. the compiled decoding step
    if compile:
        compiled = compile_decoding(fuse_for_inference(copy.deepcopy(model), for_compile=True))
        start = time.perf_counter()
        with torch.inference_mode():
            first = generate(compiled, [prompt], max_new_tokens=new_tokens)
        first_call_s = time.perf_counter() - start
        compiled_s, compiled_tokens = best_time(lambda: generate(compiled, [prompt], max_new_tokens=new_tokens), repeats,
                                                "the compiled step")
        rate = new_tokens / compiled_s
        compiled_decoding = decode_rate(compiled, prompt, new_tokens, repeats)
        figures.update(compile_s=compiled.compile_seconds, compiled_tokens_per_s=rate,
                       compiled_decoding_tokens_per_s=compiled_decoding,
                       compiled_fraction_of_bound=compiled_decoding / bound)
        gain_per_token = 1 / lit - 1 / rate  # seconds saved per token once compiled
        pays_after = f"after {compiled.compile_seconds / gain_per_token:,.0f} tokens" if gain_per_token > 0 else "never"
        print(f"\n3. --compile: compiling the decoding step took {compiled.compile_seconds:.1f} s (first call "
              f"{first_call_s:.1f} s in all); then {rate:.1f} tokens/s vs {lit:.1f} eager "
              f"(same tokens: {same(first, tokens) and same(compiled_tokens, tokens)}); decoding steps "
              f"{compiled_decoding:.1f} tokens/s, {100 * compiled_decoding / bound:.0f}% of the bound. It pays for itself "
              f"{pays_after}.")

    # 4. batched
    lengths = torch.linspace(prompt_length // 2, prompt_length * 3 // 2, batch_size).long().tolist()
    prompts = [torch.randint(0, config.vocab_size, (n,)) for n in lengths]
    lit_s, lit_batch = best_time(lambda: generate(fused, prompts, max_new_tokens=new_tokens), repeats, "batch")
    figures["batched_tokens_per_s"] = batch_size * new_tokens / lit_s
    print(f"\n4. Batch {batch_size}: prompts of {lengths[0]} to {lengths[-1]} tokens, {new_tokens} new tokens each")
    print(f"  lit-lora           {figures['batched_tokens_per_s']:7.1f} tokens/s   (right padding, each row at its own "
          f"positions; every row as alone: {same(lit_batch, [generate(fused, [p], new_tokens)[0] for p in prompts])})")
    if hf is not None:
        hf_s, hf_batch = best_time(lambda: hf_generate(hf, prompts, new_tokens), repeats, "HF's batch")
        figures.update(hf_batched_tokens_per_s=batch_size * new_tokens / hf_s, batched_ratio=hf_s / lit_s)
        rows_same = sum(torch.equal(a, b) for a, b in zip(lit_batch, hf_batch))
        print(f"  Hugging Face       {figures['hf_batched_tokens_per_s']:7.1f} tokens/s   (left padding; rows with the "
              f"same tokens: {rows_same} of {batch_size})")
        print(f"  lit-lora / Hugging Face: {figures['batched_ratio']:.2f}x")

    # 5. prefill
    long_prompt = torch.randint(0, config.vocab_size, (prefill_length,))
    lit_s, lit_first = best_time(lambda: generate(fused, [long_prompt], max_new_tokens=1), repeats, "prefill")
    figures["prefill_ms"] = 1000 * lit_s
    print(f"\n5. Prefill: time to the first token of a {prefill_length}-token prompt")
    print(f"  lit-lora           {1000 * lit_s:7.1f} ms")
    if hf is not None:
        hf_s, hf_first = best_time(lambda: hf_generate(hf, [long_prompt], 1), repeats, "HF's prefill")
        figures.update(hf_prefill_ms=1000 * hf_s, prefill_ratio=hf_s / lit_s)
        print(f"  Hugging Face       {1000 * hf_s:7.1f} ms   (same token: {same(hf_first, lit_first)}); "
              f"lit-lora is {figures['prefill_ratio']:.2f}x as fast")
    for warning in WARNINGS:
        print(warning)
    figures["warnings"] = list(WARNINGS)
    return figures


if __name__ == "__main__":
    cli(main)
