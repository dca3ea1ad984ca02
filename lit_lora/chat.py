"""What the generate scripts share: their flags, the prompt format a model was finetuned in, answering one prompt,
and the interactive chat that keeps a conversation.

The format is the one the model learned: a LoRA file, an adapter file and a full finetune's model_config.json record
the style of the data they were trained on (its system prompt, and for a checkpoint's own chat template, that
template's sha256), and the scripts use it unless --prompt_style says otherwise, with a warning naming both.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Literal, Optional, Union

import torch

from lit_lora.chat_template import CHARS_PER_TOKEN, TooLongForContext
from lit_lora.checkpoint import load_model
from lit_lora.cli import check_flag, config_flags
from lit_lora.devices import default_precision, dtype_from_precision
from lit_lora.generation import check_sampling, generate_stream, stream_text
from lit_lora.inference import compile_decoding, fuse_for_inference, worth_compiling
from lit_lora.lora import merge_lora
from lit_lora.model import LLaMA
from lit_lora.prompts import (
    PROMPT_STYLES,
    encode_prompt,
    format_prompt,
    render_chat,
    response_stop_ids,
    template_sha256,
)
from lit_lora.quantize import check_quantize, is_4bit, load_model_4bit
from lit_lora.report import format_bytes, peak_memory_bytes
from lit_lora.tokenizer import Tokenizer, check_utf8


@dataclass
class GenerateArgs:
    """Options shared by every generate script (each script adds what its method needs).

    Args:
        checkpoint_dir: Folder with lit_model.pth, model_config.json and the tokenizer (tokenizer.model or tokenizer.json).
        prompt: The text to continue (base model) or the instruction to answer (finetuned models).
        max_new_tokens: Generate at most this many tokens (fewer if a stop token, such as EOS, comes first).
        temperature: 0 is greedy decoding; higher values sample more freely.
        top_k: Sample only among the k most likely tokens (null: all).
        top_p: Sample only from the smallest set of tokens whose probability reaches p (1.0: off).
        num_samples: How many answers to generate.
        seed: Random seed for sampling; sample i uses seed + i (null: different every run).
        precision: Weights' precision: 32-true, bf16-true or 16-true; default bf16-true on a GPU that supports it, else 32-true.
        compile: Decode with the one-token step compiled ahead of time (lit_lora/inference.py), faster on a CPU.
            Compiled once per model shape, torch and CPU (its time reported), kept in ~/.cache/lit_lora (or
            $LIT_LORA_CACHE) and loaded by every later run in a moment. auto: on a CPU, for a model of 50M
            parameters or more (a smaller one decodes fast enough eagerly); true: always (on a GPU too, untested
            there); false: never. See howto/generate.md, "Speed".
        fused: Decode with q/k/v and gate/up fused, weights transposed unless --compile (lit_lora/inference.py):
            the same tokens, faster; false: the layers exactly as lit_lora/model.py defines them.
        interactive: Read prompts from the terminal in a loop instead of using --prompt; in a chat style the
            conversation is kept (/reset starts a new one).
        prompt_style: Put the prompt in a format (lit_lora/prompts.py): alpaca, chat_template (the checkpoint's own
            chat template), llama3 (Llama 3.x Instruct) or chatml (SmolLM2-Instruct), and stop also at that format's
            end of answer; null: the format the model was finetuned in, where it was recorded, else none.
        system_prompt: A system turn before the conversation (chat styles); null: the one the model was finetuned
            with, if any.
        quantize: Store the Blocks' weights in 4 bits (bnb.nf4, or bnb.nf4-dq: see howto/finetune_qlora.md): about
            a quarter of the memory of bf16, slower; null: in the precision's dtype. Needs pip install -e '.[quantize]'.
    """

    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf")  # what README's download and convert_hf commands create
    prompt: str = "Hello, my name is"
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0
    num_samples: int = 1
    seed: Optional[int] = 1234
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None
    compile: Union[bool, Literal["auto"]] = "auto"
    fused: bool = True
    interactive: bool = False
    prompt_style: Optional[str] = None
    system_prompt: Optional[str] = None
    quantize: Optional[str] = None

    def __post_init__(self):
        """Refuse a value that means nothing while the flags are parsed, before the model is loaded."""
        check_utf8(self.prompt, "--prompt")
        if self.system_prompt is not None:
            check_utf8(self.system_prompt, "--system_prompt")
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be at least 1")
        check_sampling(self.temperature, self.top_k, self.top_p, flag_prefix="--")
        check_flag(self, "num_samples", self.num_samples >= 1, "must be at least 1")
        check_flag(self, "seed", self.seed is None or 0 <= self.seed < 2**63,
                   "must be from 0 to 2**63 - 1, or null for different answers every run")
        check_flag(self, "prompt_style", self.prompt_style is None or self.prompt_style in PROMPT_STYLES,
                   f"is not a prompt style; choose one of {', '.join(PROMPT_STYLES)} (see lit_lora/prompts.py)")
        with config_flags():
            check_quantize(self.quantize)
        check_flag(self, "compile", not (self.compile is True and self.quantize), "cannot compile a 4-bit base "
                   f"(--quantize {self.quantize}): its bitsandbytes layers are not exported; leave --compile out")


def load_for_generation(args: GenerateArgs) -> LLaMA:
    """The checkpoint of args.checkpoint_dir as --quantize asks: its Blocks' weights in 4 bits, each quantized as it
    is read; else as stored, on the meta device with memory-mapped weights (no second copy in RAM)."""
    if args.quantize is None:
        return load_model(args.checkpoint_dir)
    return load_model_4bit(args.checkpoint_dir, args.quantize)


def prepare_for_generation(model: LLaMA, precision: Optional[str] = None, compile: Union[bool, str] = False,
                           fused: bool = True, merge: bool = False) -> LLaMA:
    """Move a loaded model to the GPU if there is one, in the precision asked for, in eval mode; with `merge`, its
    LoRA merged (W = W0 + alpha/r B A) after that cast, so W is computed in fp32 and rounded once, to the dtype it
    runs in; with `fused`, in the fused layout of lit_lora/inference.py (the same tokens, faster); with `compile`
    (True, or "auto": see GenerateArgs), its decoding step compiled ahead of time (lit_lora/inference.py)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype_from_precision(precision or default_precision())).eval()
    if merge:
        merge_lora(model)
    quantized = any(is_4bit(weight) for weight in model.parameters())  # a 4-bit base: its layers are not exported
    compiling = compile is True or (compile == "auto" and device == "cpu" and not quantized and worth_compiling(model))
    if fused:
        fuse_for_inference(model, for_compile=compiling)
    if compiling:
        compile_decoding(model)
    return model


def prompt_format(model: LLaMA, tokenizer: Tokenizer, args: GenerateArgs,
                  default: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(style, system prompt) to generate in: --prompt_style and --system_prompt where given, else what the model
    was finetuned in (`model.prompt_format`, which loading a method file or a finetuned checkpoint sets), else `default`.
    A flag that differs from the recorded format, or a chat template that is not the one trained with, is warned
    about: the model answers best in the format it learned."""
    recorded = getattr(model, "prompt_format", None) or {}
    style = args.prompt_style or recorded.get("style") or default
    if args.prompt_style and recorded.get("style") and args.prompt_style != recorded["style"]:
        print(f"Warning: --prompt_style {args.prompt_style}, but the model was finetuned in the "
              f"{recorded['style']} style: it answers best in that one (leave --prompt_style out to use it).",
              file=sys.stderr)
    if style == "chat_template" and recorded.get("chat_template_sha256") not in (None, template_sha256(
            tokenizer.chat_template)):
        print(f"Warning: {tokenizer.model_path.parent}'s chat template is not the one the model was finetuned with: "
              "its prompts may differ from what it learned.", file=sys.stderr)
    system_prompt = args.system_prompt if args.system_prompt is not None else (
        recorded.get("system_prompt") if style == recorded.get("style") else None)  # the recorded one, with its style
    return style, system_prompt


def run_generation(model: LLaMA, args: GenerateArgs, input: str = "", default_style: Optional[str] = None,
                   merge: bool = False) -> list[str]:
    """What every generate script does once its model is built: answer --prompt, or chat with --interactive.

    In a prompt style (prompt_format) each prompt is an instruction (with `input`, the instruction scripts' --input)
    put in that format, and an answer ends at the format's end of answer too; without one, the prompt is continued
    as it is, and shown before its continuation. An answer always ends at the tokenizer's stop ids."""
    model = prepare_for_generation(model, args.precision, args.compile, args.fused, merge)
    tokenizer = Tokenizer(args.checkpoint_dir)
    style, system_prompt = prompt_format(model, tokenizer, args, default_style)
    stop_ids = tokenizer.stop_ids if style is None else response_stop_ids(tokenizer, style)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, stop_ids=stop_ids, style=style)
    check_system_prompt(model, tokenizer, system_prompt)
    if args.interactive:
        interactive_chat(model, tokenizer, style, system_prompt, input, options)
        return []
    max_chars = CHARS_PER_TOKEN * model.config.block_size  # a rendered prompt longer than this cannot fit
    prompt = args.prompt if style is None else format_prompt(args.prompt, input, style, tokenizer, system_prompt,
                                                             max_chars)
    return generate_and_print(model, tokenizer, prompt, show_prompt=style is None, **options)


def interactive_chat(model: LLaMA, tokenizer: Tokenizer, style: Optional[str], system_prompt: Optional[str],
                     input: str, options: dict) -> None:
    """Read a line, stream the answer, repeat. In a chat style the conversation is kept: each answer sees the
    earlier turns, the oldest exchanges are left out when the context is full, and /reset starts over. Otherwise
    each line is a prompt of its own. An empty line, Ctrl-D or Ctrl-C at the prompt quits; Ctrl-C during an answer
    stops only that answer; a line that cannot be answered (not UTF-8, too long) gets an error. Either way the loop
    asks for the next line."""
    chat = style not in (None, "alpaca")
    system = [{"role": "system", "content": system_prompt}] if chat and system_prompt else []
    history: list[dict] = []
    max_chars = CHARS_PER_TOKEN * model.config.block_size  # a rendered prompt longer than this cannot fit
    if chat:
        print("A conversation in the model's chat format: /reset starts a new one; an empty line quits.",
              file=sys.stderr)
    while True:
        try:
            line = input_line(">> You: " if chat else ">> Instruction: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        if chat and line.strip() == "/reset":
            history = []
            print("(A new conversation.)", file=sys.stderr)
            continue
        turn = [{"role": "user", "content": line}]
        try:
            check_utf8(line, "This line")
            if not chat:
                prompt = line if style is None else format_prompt(line, input, style, tokenizer)
                generate_and_print(model, tokenizer, prompt, **options)
                continue
            history = fitting_history(model, tokenizer, style, system, history, turn, options["max_new_tokens"])
            prompt = render_chat(system + history + turn, style, True, tokenizer, max_chars)
            answer = generate_and_print(model, tokenizer, prompt, **{**options, "num_samples": 1})[0]
            history += turn + [{"role": "assistant", "content": answer}]
        except ValueError as error:  # a line that cannot be answered: say why, and read the next one
            print(f"error: {error}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C during an answer: the turn is left out of the conversation
            print(flush=True)
            print("Answer stopped (Ctrl-C). Ctrl-C or Ctrl-D at the prompt quits.", file=sys.stderr)


def check_system_prompt(model: LLaMA, tokenizer: Tokenizer, system_prompt: Optional[str]) -> None:
    """A system prompt (given, or recorded with the model) that fills the context alone would fail every prompt:
    said once, before the first, naming it rather than the prompt. Only what could fit is tokenized."""
    if not system_prompt:
        return
    check_utf8(system_prompt, "The system prompt")
    block_size = model.config.block_size
    length = len(tokenizer.encode(system_prompt[:CHARS_PER_TOKEN * block_size], bos=False))
    if length >= block_size:
        at_least = "at least " if len(system_prompt) > CHARS_PER_TOKEN * block_size else ""
        raise ValueError(f"the system prompt alone is {at_least}{length} tokens, and the model's context is "
                         f"{block_size}: give a shorter one with --system_prompt ('' for none)")


def fitting_history(model: LLaMA, tokenizer: Tokenizer, style: str, system: list[dict], history: list[dict],
                    turn: list[dict], max_new_tokens: int) -> list[dict]:
    """`history` less its oldest exchanges, as many as must go for the conversation and an answer of
    max_new_tokens to fit in the context (said when it happens)."""
    dropped, max_chars = 0, CHARS_PER_TOKEN * model.config.block_size
    while history:
        try:
            text = render_chat(system + history + turn, style, True, tokenizer, max_chars)
            if len(encode_prompt(tokenizer, text, style)) + max_new_tokens <= model.config.block_size:
                break
        except TooLongForContext:  # far too long: it does not fit either
            pass
        history, dropped = history[2:], dropped + 1  # a user turn and its answer
    if dropped:
        print(f"(The oldest {dropped} exchange(s) no longer fit in the context: left out.)", file=sys.stderr)
    return history


def input_line(prompt: str) -> str:
    """A line from the terminal; bytes that are not UTF-8 are kept as Python keeps them, for check_utf8 to name."""
    try:
        return input(prompt)
    except UnicodeDecodeError as error:  # a terminal in UTF-8 (strict) mode read bytes that are not UTF-8
        return error.object.decode("utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------------------------------------
# Answering one prompt: printing and timing


def check_prompt_length(model: LLaMA, prompt_length: int, max_new_tokens: int) -> int:
    """The number of new tokens that fit in the context: an error if the prompt alone does not fit,
    fewer new tokens (with a warning) if prompt + max_new_tokens does not."""
    block_size = model.config.block_size
    if prompt_length == 0:  # nothing to continue: a tokenizer that puts no BOS first (SmolLM2) and an empty prompt
        raise ValueError("The prompt is empty, and this model's tokenizer puts no BOS before a text: give a prompt.")
    if prompt_length >= block_size:
        raise ValueError(
            f"The prompt is {prompt_length} tokens, but the model's context is {block_size}: shorten the prompt."
        )
    if prompt_length + max_new_tokens > block_size:
        fitting = block_size - prompt_length
        print(f"Warning: {prompt_length} prompt tokens + {max_new_tokens} new tokens exceed the context "
              f"({block_size}); generating at most {fitting} tokens.", file=sys.stderr)
        return fitting
    return max_new_tokens


# inference_mode, not only no_grad: without autograd's bookkeeping (version counters, dispatch) each of a decoding
# step's few hundred small operations is cheaper (howto/generate.md, "Speed", says by how much where it was measured).
# generate_stream itself stays no_grad, for the training loop's evaluation under FSDP (lit_lora/generation.py).
@torch.inference_mode()
def generate_and_print(model: LLaMA, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
                       temperature: float = 0.8, top_k: Optional[int] = 200, top_p: float = 1.0,
                       num_samples: int = 1, seed: Optional[int] = None, show_prompt: bool = False,
                       stop_ids: Optional[Collection[int]] = None, style: Optional[str] = None) -> list[str]:
    """What every generate script does with one prompt string: stream `num_samples` continuations to
    stdout (after the prompt itself if `show_prompt`) and report time, tokens/s and peak memory on stderr.
    Each stops at any of `stop_ids` (None: tokenizer.stop_ids). The prompt is encoded as its prompt `style`
    writes it (lit_lora/prompts.py's encode_prompt). Returns the generated texts."""
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    device = model.lm_head.weight.device
    encoded = encode_prompt(tokenizer, prompt, style).to(device)
    max_new_tokens = check_prompt_length(model, len(encoded), max_new_tokens)
    texts = []
    kv_length = kv_cache_length(model, len(encoded) + max_new_tokens)
    for i in range(num_samples):
        model.set_kv_cache(batch_size=1, max_seq_length=kv_length)
        compile_seconds = 0.0  # --compile: the step loaded (or compiled, this long) before the answer
        if hasattr(model, "prepare_decoding_step"):
            compile_seconds = model.prepare_decoding_step(batch_size=1)
        start, token_times, pieces = time.perf_counter(), [], []
        if show_prompt:
            print(prompt, end="", flush=True)
        stream = generate_stream(model, [encoded], max_new_tokens, temperature, top_k, top_p, stop_ids,
                                 seed=None if seed is None else seed + i, vocab_size=tokenizer.vocab_size)
        try:
            for piece in stream_text(tokenizer, time_tokens(stream, token_times), stop_ids):
                pieces.append(piece)
                print(piece, end="", flush=True)
        finally:
            model.clear_kv_cache()  # also when Ctrl-C stops the answer
        print(flush=True)
        texts.append("".join(pieces))
        print(f"Sample {i + 1}: {timing_summary(start, token_times, compile_seconds)}; "
              f"peak memory {format_bytes(peak_memory_bytes(device))}", file=sys.stderr)
    return texts


def kv_cache_length(model: LLaMA, needed: int) -> int:
    """The KV cache to decode `needed` positions with: as many, or for a compiled step (compiled per cache length)
    the next of 256, 512, 1024, ... so that other prompts and the turns of a conversation reuse a few steps."""
    if not hasattr(model, "compile_seconds"):  # not prepared with --compile (lit_lora/inference.py)
        return needed
    return min(max(256, 1 << (needed - 1).bit_length()), model.config.block_size)


def time_tokens(stream: Iterator[torch.Tensor], times: list[float]) -> Iterator[torch.Tensor]:
    """Pass a token stream through, noting when each token was ready (to report the speed of each phase)."""
    for token in stream:
        times.append(time.perf_counter())
        yield token


def timing_summary(start: float, token_times: list[float], compile_seconds: float = 0.0) -> str:
    """'N tokens in T s, R tokens/s (first token after P s, then D tokens/s)': the first token waits for the
    prefill (the whole prompt at once), the others are decoding steps. Time spent compiling the decoding step
    before (--compile) is reported apart, so the speed is the speed of every later run."""
    n, elapsed = len(token_times), time.perf_counter() - start
    summary = f"{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s"
    if n >= 2:
        summary += (f" (first token after {token_times[0] - start:.2f} s, "
                    f"then {(n - 1) / (token_times[-1] - token_times[0]):.1f} tokens/s)")
    if compile_seconds > 0:
        summary += f", after compiling the decoding step in {compile_seconds:.1f} s (once: later runs load it)"
    return summary
