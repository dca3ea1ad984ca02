"""Sampling from a LLaMA: one token at a time, with the KV cache.

Decoding is two phases. The *prefill* runs the whole prompt through the model once, filling the KV cache.
Each *decode* step then feeds only the newest token at its position; attention reads the earlier keys and
values from the cache, so a step costs one position, not the whole sequence. At batch size 1 a step reads
every weight once for very little arithmetic: decoding is bound by memory bandwidth, not FLOPs.

Batched prompts of different lengths are right-padded. Every row keeps its own positions (the model takes
(B, T) positions), so a row is computed exactly as if it were alone: the padding it wrote into the cache
sits at positions the row has not reached yet, hidden by the causal mask, and is overwritten as it goes.
"""

from typing import Collection, Iterator, Optional

import torch

from lit_lora.model import LLaMA
from lit_lora.tokenizer import Tokenizer


def check_sampling(temperature: float, top_k: Optional[int], top_p: float, flag_prefix: str = "") -> None:
    """Refuse sampling settings that mean nothing, naming the setting, its value and what it must be.

    generate_stream checks once per call; the generate scripts check their flags with it while parsing
    (flag_prefix="--"), so both give the same message."""
    no_limit = "null" if flag_prefix else "None"  # how a command line says None
    settings = [
        ("temperature", temperature, temperature >= 0,  # also refuses nan
         "must be >= 0 (0: greedy decoding, always the most likely token)"),
        ("top_k", top_k, top_k is None or top_k >= 1,
         f"must be at least 1 (1: greedy decoding), or {no_limit} to sample among all tokens"),
        ("top_p", top_p, 0 < top_p <= 1,
         "must be in (0, 1] (1.0: off; a tiny value keeps only the most likely token)"),
    ]
    for name, value, ok, requirement in settings:
        if not ok:
            raise ValueError(f"{flag_prefix}{name} {value}: {requirement}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab): greedy at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (nucleus sampling). The most likely token is never cut off."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled).all():  # a temperature so small that logits / temperature overflows: the same
        # distribution, computed from the largest logit down (which stays 0, the others go to -inf), in float64
        scaled = (logits.double() - logits.double().amax(dim=-1, keepdim=True)) / temperature
    logits = scaled
    if top_k is not None and top_k < logits.size(-1):
        # Keep exactly the k best. torch.topk picks k indices even among equal logits, where a comparison
        # with the k-th best value (`logits < kth`) would keep every token tied with it.
        best = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        # order[b, r] is the id ranked r (stable: equal logits keep id order, as argmax does)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the probability of the tokens ranked above each
        drop_sorted = before >= top_p  # those already reach top_p: this token is not needed
        drop_sorted[..., 0] = False  # the most likely token always stays, so a tiny top_p is greedy decoding
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


# no_grad, not inference_mode: the training loop's evaluation generates with a model that FSDP may shard, and
# FSDP does not support inference tensors (nor can they ever take part in autograd later).
@torch.no_grad()
def generate_stream(model: LLaMA, prompts: list[torch.Tensor], max_new_tokens: int, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Collection[int] = (),
                    seed: Optional[int] = None, vocab_size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yield one (B,) tensor of new tokens per step, until every row has produced one of `stop_ids` or
    `max_new_tokens` tokens. A row that has finished yields its stop id again while the others go on.

    `stop_ids`: every id that ends an answer, `tokenizer.stop_ids` (EOS, and for Llama 3 Instruct also <|eot_id|>
    and <|eom_id|>); empty: only max_new_tokens ends it.

    Only ids below `vocab_size` are ever picked (None: model.config.vocab_size). Give the tokenizer's
    vocab_size: a checkpoint's vocabulary is often padded beyond the tokenizer's pieces, and an id the
    tokenizer does not have cannot be decoded.

    The model must have a KV cache of batch size len(prompts) and at least
    max(prompt lengths) + max_new_tokens positions (see `generate`, which sets it up).
    """
    check_sampling(temperature, top_k, top_p)  # once per call, not per token
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be >= 0")
    if isinstance(stop_ids, int):
        raise TypeError(f"stop_ids {stop_ids}: a collection of ids, e.g. tokenizer.stop_ids or [{stop_ids}]")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size {vocab_size}: must be at least 1 (the tokenizer's vocab_size), or None")
    # The logits have config.padded_vocab_size columns: pick none past the model's or the tokenizer's vocabulary
    vocab_size = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    B, T = len(prompts), int(lengths.max())
    idx = torch.zeros(B, T, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, : len(prompt)] = prompt  # right padding

    last = torch.zeros(B, T, dtype=torch.bool, device=device)
    last[torch.arange(B, device=device), lengths - 1] = True  # each row's last prompt position
    logits = model(idx, torch.arange(T, device=device), logits_at=last)  # prefill: (B, vocab)
    input_pos = lengths.clone()  # (B,): where each row's next token goes
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    token = None
    for step in range(max_new_tokens):
        sampled = sample(logits[..., :vocab_size], temperature, top_k, top_p, generator)  # (B,)
        token = sampled if token is None else torch.where(finished, token, sampled)  # a finished row repeats its stop id
        finished |= torch.isin(token, stop)
        yield token
        if finished.all() or step == max_new_tokens - 1:
            return
        logits = model(token.unsqueeze(1), input_pos.unsqueeze(1))[:, -1]  # decode one position: (B, vocab)
        input_pos += 1


def generate(model: LLaMA, prompts: list[torch.Tensor], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Collection[int] = (),
             seed: Optional[int] = None, vocab_size: Optional[int] = None) -> list[torch.Tensor]:
    """The new tokens of each prompt (cut before its first stop id), with a fresh KV cache.
    The options are generate_stream's; pass vocab_size=tokenizer.vocab_size when the tokens will be decoded."""
    prompt_length = max(len(p) for p in prompts)
    model.set_kv_cache(batch_size=len(prompts), max_seq_length=prompt_length + max_new_tokens)
    try:
        steps = list(generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, seed,
                                     vocab_size))
    finally:
        model.clear_kv_cache()
    if not steps:
        return [torch.empty(0, dtype=torch.long) for _ in prompts]
    tokens = torch.stack(steps, dim=1).cpu()  # (B, steps)
    outputs = []
    for row in tokens:
        stopped = torch.isin(row, torch.tensor(list(stop_ids), dtype=torch.long)).nonzero()
        outputs.append(row[: int(stopped[0])] if len(stopped) else row)
    return outputs


def stream_text(tokenizer: Tokenizer, tokens: Iterator[torch.Tensor],
                stop_ids: Optional[Collection[int]] = None) -> Iterator[str]:
    """Turn a stream of single tokens into a stream of text pieces.

    SentencePiece decodes a token differently alone than in context (the leading space of '▁word', bytes of a
    multi-byte character), so decode everything so far and emit what is new. Stops before any of `stop_ids`
    (None: tokenizer.stop_ids).
    """
    stop_ids = set(tokenizer.stop_ids if stop_ids is None else stop_ids)
    ids: list[int] = []
    printed = ""
    for token in tokens:
        token_id = int(token.reshape(-1)[0])
        if token_id in stop_ids:
            break
        ids.append(token_id)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(printed):]
        printed = text
