"""lm-eval-harness's model interface over lit-lora's own LLaMA: any harness task, on the model as it is loaded (LoRA
unmerged, an adapter, a 4-bit base), with no conversion to Hugging Face.

The harness asks three things of a model, each a batch of requests:
- loglikelihood(context, continuation): log P(continuation | context) and whether greedy decoding would write it
  (multiple choice: the choice with the highest log-likelihood is the answer);
- loglikelihood_rolling(text): log P(text), in windows of the context (perplexity);
- generate_until(context, until): a greedy answer, cut at the first stop sequence.

Its figures are the harness's own only if the tokens are: this module tokenizes as lm-eval's Hugging Face model
(`lm_eval --model hf`) does. A text is encoded with BOS first where the tokenizer puts one, unless the text already
starts with BOS's own text (as a chat template writes it); the texts of special tokens are read as those tokens. A
context and its continuation are encoded whole and split after the context's tokens, the context's trailing spaces
moved onto the continuation first ("Answer:" + " Paris", not "Answer: " + "Paris"), so that the word boundary is
tokenized as in running text. An empty context is the BOS token (else EOS). A context too long for the model is
truncated from the left, keeping the continuation, as the harness truncates.

Scoring is a forward pass per batch of right-padded rows, with logits computed only at the positions that predict a
continuation token, as training computes them only where there is a label. A context shared by several continuations
(a multiple-choice question and its choices) is read once, into the KV cache that decoding uses, and each choice then
reads only its own tokens.
"""

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lit_lora.files import atomic_write
from lit_lora.generation import generate_stream
from lit_lora.model import LLaMA
from lit_lora.prompts import render_chat
from lit_lora.tokenizer import Tokenizer

INSTALL_HINT = 'lm-eval is not installed: pip install -e ".[eval]"'


# ---------------------------------------------------------------------------------------------------------
# Tokens as the harness's Hugging Face model makes them


def harness_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as lm-eval's HF model encodes it (tok_encode): BOS first where the tokenizer adds one, unless the text
    starts with BOS's own text; special tokens' texts are those tokens."""
    bos_text = tokenizer.special_tokens.get("bos_token")
    writes_bos = bool(bos_text) and text.startswith(bos_text)
    return tokenizer.encode_with_offsets(text, bos=not writes_bos)[0]


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """What an empty context is, and what the first rolling window starts from: BOS, else EOS."""
    return tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), as the harness splits them (its loglikelihood and _encode_pair)."""
    if context == "":
        continuation_ids = tokenizer.encode_with_offsets(continuation, bos=False)[0]
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:  # the word boundary belongs to the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = harness_tokens(tokenizer, context + continuation)
    context_ids = harness_tokens(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token of `tokens` once, each input at most
    max_length tokens: the first from `prefix`, each later one from the token before it, and the last with as much
    context as fits (lm_eval.utils.get_rolling_token_windows with context_len=1, then make_disjoint_window)."""
    windows, predicted = [], min(max_length, len(tokens))
    if tokens:
        windows.append(([prefix], tokens[:predicted]))
    while predicted < len(tokens):
        end = min(len(tokens), predicted + max_length)
        start = max(0, end - max_length - 1)  # the window's input: tokens[start:end - 1]
        windows.append((tokens[start:predicted], tokens[predicted:end]))
        predicted = end
    return windows


# ---------------------------------------------------------------------------------------------------------
# Scoring and generating, batched


@torch.inference_mode()
def score_continuations(model: LLaMA, pairs: list[tuple[list[int], list[int]]],
                        batch_size: int) -> tuple[list[tuple[float, bool]], int]:
    """For each (context ids, continuation ids): (log P(continuation | context), whether greedy decoding writes the
    continuation), and how many contexts were truncated from the left to fit the model's context.

    A context shared by several continuations (the choices of a multiple-choice question) is read once
    (score_shared_contexts); the others are scored whole, a row each (score_rows)."""
    block_size = model.config.block_size
    for context, continuation in pairs:
        if not continuation or len(continuation) > block_size:
            raise ValueError(f"A continuation of {len(continuation)} tokens cannot be scored by a model with a "
                             f"context of {block_size}: it must be 1 to {block_size} tokens")
    truncated = sum(len(context) + len(continuation) > block_size + 1 for context, continuation in pairs)
    by_context: dict[tuple, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        by_context.setdefault(tuple(context), []).append(i)
    # shared where it saves work (the context is longer than the continuations) and fits the model uncut
    shared = [members for context, members in by_context.items() if len(members) > 1
              and len(context) > max(len(pairs[i][1]) for i in members)
              and len(context) + max(len(pairs[i][1]) for i in members) <= block_size]
    alone = sorted(set(range(len(pairs))) - {i for members in shared for i in members})
    results: list = [None] * len(pairs)
    for i, result in zip(alone, score_rows(model, [pairs[i] for i in alone], batch_size)):
        results[i] = result
    for members, group_results in zip(shared, score_shared_contexts(model, pairs, shared, batch_size)):
        for i, result in zip(members, group_results):
            results[i] = result
    return results, truncated


def continuation_scores(log_probs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """log_probs: (len(continuation), vocab), each row the prediction of one continuation token -> (the sum of the
    continuation's log-probabilities, whether each token is the most likely one)."""
    targets = torch.tensor(continuation, device=log_probs.device)
    total = float(log_probs.gather(1, targets[:, None]).sum())
    return total, bool((log_probs.argmax(dim=-1) == targets).all())


@torch.inference_mode()
def score_rows(model: LLaMA, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[tuple[float, bool]]:
    """Each pair as one row, context + continuation, the oldest tokens cut to fit the model (as the harness cuts
    them). Longest first, so that rows of a batch have similar lengths and little padding; results in the given
    order. No attention mask is needed for the right padding: causal attention never looks forward."""
    block_size, device = model.config.block_size, model.lm_head.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        # the harness's input: context + continuation less its last token, the oldest tokens cut to fit
        rows = [(pairs[i][0] + pairs[i][1])[-(block_size + 1):][:-1] for i in batch]
        idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        scored = torch.zeros_like(idx, dtype=torch.bool)  # the positions that predict a continuation token
        for row, (ids, i) in enumerate(zip(rows, batch)):
            idx[row, :len(ids)] = torch.tensor(ids)
            scored[row, len(ids) - len(pairs[i][1]):len(ids)] = True
        logits = model(idx.to(device), logits_at=scored.to(device))  # (N, vocab), row after row
        offset = 0
        for i in batch:  # one row's log-probabilities at a time: no second (N, vocab) tensor
            n = len(pairs[i][1])
            results[i] = continuation_scores(F.log_softmax(logits[offset:offset + n].float(), dim=-1), pairs[i][1])
            offset += n
    return results


@torch.inference_mode()
def score_shared_contexts(model: LLaMA, pairs: list[tuple[list[int], list[int]]], groups: list[list[int]],
                          batch_size: int) -> list[list[tuple[float, bool]]]:
    """For each group of pairs with one context: the context is read once, into the KV cache, and each
    continuation then reads only its own tokens from there. With k choices, a question of c context tokens and
    n-token answers costs c + k n token positions, not k (c + n).

    Per batch of groups: (1) the contexts, a row each: their keys and values cached, and the logits at each
    context's last token (they predict every continuation's first token); (2) the cache's rows copied to one row
    per continuation; (3) the continuations, each at the positions after its context, less their last token."""
    device = model.lm_head.weight.device
    order = sorted(range(len(groups)), key=lambda g: -len(pairs[groups[g][0]][0]))
    results: list = [None] * len(groups)
    start = 0
    while start < len(order):
        batch = [order[start]]  # groups while their continuations fit in batch_size rows (one group at least)
        while (start + len(batch) < len(order)
               and sum(len(groups[g]) for g in batch) + len(groups[order[start + len(batch)]]) <= batch_size):
            batch.append(order[start + len(batch)])
        start += len(batch)
        contexts = [pairs[groups[g][0]][0] for g in batch]
        members = [(row, i) for row, g in enumerate(batch) for i in groups[g]]  # (context row, pair) per continuation
        extra = max(len(pairs[i][1]) for _, i in members) - 1  # continuation tokens read after the context
        if max(map(len, contexts)) + extra > model.config.block_size:  # longer than the model: each alone
            for g in batch:
                results[g] = score_rows(model, [pairs[i] for i in groups[g]], batch_size)
            continue
        model.set_kv_cache(batch_size=len(batch), max_seq_length=max(map(len, contexts)) + extra)
        try:
            # (1) the contexts, right-padded; the padding's keys are never attended: each position sees only those
            # up to its own, and each continuation overwrites the positions after its context
            idx = torch.zeros(len(batch), max(map(len, contexts)), dtype=torch.long)
            last = torch.zeros_like(idx, dtype=torch.bool)
            for row, context in enumerate(contexts):
                idx[row, :len(context)] = torch.tensor(context)
                last[row, len(context) - 1] = True
            positions = torch.arange(idx.size(1)).expand_as(idx)
            first = F.log_softmax(model(idx.to(device), positions.to(device), logits_at=last.to(device)).float(), -1)
            # (2) one cache row per continuation: a copy of its context's
            context_rows = torch.tensor([row for row, _ in members], device=device)
            for block in model.blocks:
                block.attn.kv_cache.k = block.attn.kv_cache.k[context_rows]
                block.attn.kv_cache.v = block.attn.kv_cache.v[context_rows]
            # (3) the continuations' tokens but the last, at the positions after their contexts
            later = None
            if extra:
                idx = torch.zeros(len(members), extra, dtype=torch.long)
                scored = torch.zeros_like(idx, dtype=torch.bool)
                positions = torch.zeros_like(idx)
                for r, (row, i) in enumerate(members):
                    continuation = pairs[i][1][:-1]
                    idx[r, :len(continuation)] = torch.tensor(continuation, dtype=torch.long)
                    scored[r, :len(continuation)] = True
                    positions[r] = len(contexts[row]) + torch.arange(extra)
                later = model(idx.to(device), positions.to(device), logits_at=scored.to(device))  # (N, vocab)
        finally:
            model.clear_kv_cache()
        offset = 0
        for g in batch:
            results[g] = []
        for r, (row, i) in enumerate(members):
            n = len(pairs[i][1]) - 1
            log_probs = first[row:row + 1]
            if n:
                log_probs = torch.cat([log_probs, F.log_softmax(later[offset:offset + n].float(), dim=-1)])
            offset += n
            results[batch[row]].append(continuation_scores(log_probs, pairs[i][1]))
    return results


def generate_texts(model: LLaMA, tokenizer: Tokenizer, prompts: list[list[int]], until: list[str],
                   max_new_tokens: int, temperature: float = 0.0, stop_ids: Optional[tuple] = None) -> list[str]:
    """Each prompt's answer, decoded and cut before the first of `until`, as the harness's HF model cuts it. A batch
    decodes together (lit_lora/generation.py, with the KV cache); it stops when every row has written one of
    `stop_ids` (None: the tokenizer's) or a stop sequence, or max_new_tokens."""
    rows, device = len(prompts), model.lm_head.weight.device
    model.set_kv_cache(batch_size=rows, max_seq_length=max(map(len, prompts)) + max_new_tokens)
    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    stop_ids = set(tokenizer.stop_ids if stop_ids is None else stop_ids)
    try:
        stream = generate_stream(model, [torch.tensor(p, device=device) for p in prompts], max_new_tokens,
                                 temperature, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size)
        for step in stream:
            for row, token in enumerate(step.tolist()):
                if done[row]:
                    continue
                if token in stop_ids:
                    done[row] = True
                    continue
                new_tokens[row].append(token)
                text = tokenizer.decode(new_tokens[row])
                done[row] = any(term and term in text for term in until)
            if all(done):
                break
    finally:
        model.clear_kv_cache()
    texts = []
    for tokens in new_tokens:
        text = tokenizer.decode(tokens)
        for term in until:
            if term:
                text = text.split(term)[0]
        texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------------------
# The harness's model


def harness_model(model: LLaMA, tokenizer: Tokenizer, batch_size: int):
    """An lm_eval LM over `model`: the harness calls its three methods with batches of requests. The class is made
    here, where lm_eval is imported, so that lit-lora runs without the optional package."""
    from lm_eval.api.model import LM

    class LitLoRALM(LM):
        def __init__(self):
            super().__init__()
            self.truncated_contexts = 0  # contexts longer than the model's, cut from the left

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(tokenizer, *request.args) for request in requests]
            results, truncated = score_continuations(model, pairs, batch_size)
            self.truncated_contexts += truncated
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            prefix, block_size = prefix_token_id(tokenizer), model.config.block_size
            windows = [rolling_windows(harness_tokens(tokenizer, request.args[0]), prefix, block_size)
                       for request in requests]
            scores, _ = score_continuations(model, [w for text in windows for w in text], batch_size)
            totals, start = [], 0
            for text in windows:
                totals.append(sum(score for score, _ in scores[start:start + len(text)]))
                start += len(text)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            answers: list = [None] * len(requests)
            groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
            for i, request in enumerate(requests):
                groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
            for key, members in groups.items():
                until, max_new, temperature = generation_settings(json.loads(key))
                max_context = model.config.block_size - max_new
                if max_context < 1:
                    raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in the model's "
                                     f"{model.config.block_size}")
                for start in range(0, len(members), batch_size):
                    batch = members[start:start + batch_size]
                    prompts = [harness_tokens(tokenizer, requests[i].args[0])[-max_context:] for i in batch]
                    for i, text in zip(batch, generate_texts(model, tokenizer, prompts, until, max_new,
                                                             temperature)):
                        answers[i] = text
            return answers

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return chat_text(tokenizer, chat_history, add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:
            return str(tokenizer.model_path.parent).replace("/", "__")

        def chat_template(self, chat_template=False) -> Optional[str]:
            return tokenizer.chat_template if chat_template else None

    return LitLoRALM()


def chat_text(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """A conversation in the checkpoint's chat template, as the harness's HF model renders it: without a generation
    prompt, the last message is left open to be continued (transformers' continue_final_message: the text ends
    where its content ends, not at the template's end of turn; found by a tag put after the content)."""
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    if not add_generation_prompt and messages:
        messages = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + tag}]
    text = render_chat(messages, "chat_template", add_generation_prompt, tokenizer)
    if not add_generation_prompt and messages:
        at = text.rindex(tag.strip())
        text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()  # a template may strip spaces
    return text


def generation_settings(gen_kwargs: dict) -> tuple[list[str], int, float]:
    """(stop sequences, max new tokens, temperature) from a task's generation_kwargs, with the harness's defaults:
    256 new tokens, greedy unless do_sample."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = next((int(gen_kwargs[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in gen_kwargs),
                   256)
    temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
    return until, max_new, temperature


def run_harness(model: LLaMA, tokenizer: Tokenizer, tasks: list[str], include_path: Optional[Path] = None,
                num_fewshot: Optional[int] = None, limit: Optional[float] = None, batch_size: int = 8,
                apply_chat_template: bool = False) -> dict:
    """lm-eval's evaluator on `model`: its results dict, in the layout of its own results JSON."""
    try:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path}: no such folder (give the folder of your task YAMLs)")
    manager = None
    if include_path is not None:  # the user's own tasks are found without indexing the harness's thousands
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(name not in manager.all_tasks for name in tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}: `lm-eval ls tasks` lists the harness's tasks "
                         "(with --include_path DIR, yours as well)")
    if apply_chat_template and tokenizer.chat_template is None:
        raise ValueError(f"--apply_chat_template: {tokenizer.model_path.parent} has no chat template")
    lm = harness_model(model, tokenizer, batch_size)
    try:
        results = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                            task_manager=manager, apply_chat_template=apply_chat_template,
                                            batch_size=batch_size, log_samples=False)
    except (ConnectionError, TimeoutError) as error:
        raise OSError(f"a task's data could not be downloaded ({error}): the task(s) {', '.join(tasks)} need their "
                      "dataset on disk (in the Hugging Face cache, or local files in the task's YAML) or a "
                      "network") from None
    if lm.truncated_contexts:
        print(f"{lm.truncated_contexts} context(s) longer than the model's {model.config.block_size} tokens were "
              "truncated from the left, as lm-eval does", file=sys.stderr)
    results["truncated_contexts"] = lm.truncated_contexts
    return results


def write_results(results: dict, path: Path) -> None:
    """The results as JSON, written whole or not at all."""
    def default(value):  # what json cannot write (a dtype, a function in a task's config): its text
        return str(value)

    text = json.dumps(results, indent=2, default=default, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
