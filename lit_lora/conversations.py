"""Conversations as training data: the text a chat style makes of them, and the loss on the assistant's turns only.

A conversation (messages of system, user and assistant) is rendered whole, as the model will read it at inference,
and encoded once. Which of its tokens carry loss is found from the text itself: a chat style writes a conversation's
beginning as the beginning of the whole (the same text, however many turns follow), so the assistant's turn i spans
from the end of the conversation up to turn i, rendered with the assistant's header (add_generation_prompt), to the
end of the conversation through turn i. Its tokens are those whose characters start in that span, up to and including
the first end-of-turn token (the style's end, or the tokenizer's stop tokens): the assistant's words and where it
stops, and nothing of the headers, the system prompt, the user, or what a template writes after the end-of-turn
token. This holds for any template that renders prefixes as prefixes, which is checked, not assumed.

Where a style's end of turn is not one token of the tokenizer (llama3's <|eot_id|> on a SentencePiece model) it stays
text, and EOS follows the conversation: generation can only stop at an id. Instruction records in a chat style are
conversations of one exchange (lit_lora/data.py), so the same rule holds for them.
"""

from typing import Optional

import torch

from lit_lora.chat_template import CHARS_PER_TOKEN, MAX_RENDERED_CHARS, TooLongForContext
from lit_lora.prompts import prompt_style, render_chat, response_stop_ids, single_token_id, template_writes_bos
from lit_lora.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy skips them)


def assistant_spans(messages: list[dict], style: str, tokenizer: Tokenizer,
                    max_chars: int = MAX_RENDERED_CHARS) -> tuple[str, list[tuple[int, int]]]:
    """The text of the whole conversation, and the (start, end) characters of each assistant turn in it."""
    text = render_chat(messages, style, add_generation_prompt=False, tokenizer=tokenizer, max_chars=max_chars)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], style, True, tokenizer, max_chars)
        through = render_chat(messages[:i + 1], style, False, tokenizer, max_chars)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"the {style} style does not write the beginning of a conversation as the beginning of "
                             "the whole conversation, so its assistant turns cannot be found in it")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(messages: list[dict], tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool = True,
                          style: str = "chat_template") -> Optional[dict]:
    """input_ids of the rendered conversation, and labels: the assistant turns' tokens (all tokens if not
    mask_inputs), -100 elsewhere. A conversation too long for max_seq_length loses its earliest exchanges (a user
    turn and what follows it, up to the next user turn; what comes before the first user turn, a system turn, stays),
    then, with one exchange left, is cut at max_seq_length. None when no assistant token is left to learn.
    `dropped_turns` counts the exchanges left out, `truncated` whether it was cut.

    The exchanges kept are the most that fit, counted from the last: found by doubling their number, then halving
    the gap, so that a conversation of thousands of turns is rendered a few times, each time at most a context's
    worth of text (CHARS_PER_TOKEN a token), not once per exchange dropped. A turn longer than that alone is an error:
    it could never be read."""
    max_chars = CHARS_PER_TOKEN * max_seq_length
    for i, message in enumerate(messages):
        if len(message["content"]) > max_chars:
            raise ValueError(f"turn {i} ({message['role']}) is {len(message['content']):,} characters: far more than "
                             f"max_seq_length={max_seq_length} tokens can hold (at most {max_chars:,} characters, at "
                             f"{CHARS_PER_TOKEN} a token). Split or shorten the turn, or remove the conversation")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    head = messages[:users[0]] if users else messages  # the system turn: it stays
    exchanges = [messages[a:b] for a, b in zip(users, users[1:] + [len(messages)])]
    bos = not template_writes_bos(style)
    end = prompt_style(style).response_end
    eos_after = end is not None and single_token_id(tokenizer, end) is None  # the end of a turn is text: then EOS

    def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = tokenizer.encode_with_offsets(text, bos=bos)
        return (ids + [tokenizer.eos_id], offsets + [(len(text), len(text))]) if eos_after else (ids, offsets)

    def encoded(kept: int) -> Optional[tuple[str, list[int], list[tuple[int, int]]]]:
        """The text, ids and offsets of the head and the last `kept` exchanges; None if they do not fit."""
        conversation = head + [m for exchange in exchanges[len(exchanges) - kept:] for m in exchange]
        try:
            text = render_chat(conversation, style, add_generation_prompt=False, tokenizer=tokenizer,
                               max_chars=max_chars)
        except TooLongForContext:
            return None
        ids, offsets = encode(text)
        return (text, ids, offsets) if len(ids) <= max_seq_length else None

    fitting, found = len(exchanges), None
    if len(exchanges) > 1:  # the most exchanges that fit: double while they do, then halve the gap
        fitting, over = 1, len(exchanges) + 1
        while fitting < len(exchanges) and over == len(exchanges) + 1:
            attempt = min(2 * fitting, len(exchanges))
            found_now = encoded(attempt)
            fitting, found, over = (attempt, found_now, over) if found_now else (fitting, found, attempt)
        while over - fitting > 1:
            attempt = (fitting + over) // 2
            found_now = encoded(attempt)
            fitting, found, over = (attempt, found_now, over) if found_now else (fitting, found, attempt)
    kept = head + [m for exchange in exchanges[len(exchanges) - fitting:] for m in exchange]
    try:
        text, spans = assistant_spans(kept, style, tokenizer, max_chars)
    except TooLongForContext:  # one exchange left, and it does not fit: the turns, or what the template adds?
        if 2 * sum(len(m["content"]) for m in kept) < max_chars:
            raise
        longest = max(range(len(kept)), key=lambda i: len(kept[i]["content"]))
        raise ValueError(f"its last exchange{' and system turn are' if head else ' is'} over {max_chars:,} characters "
                         f"once rendered: far more than max_seq_length={max_seq_length} tokens can hold (the longest "
                         f"turn: {messages.index(kept[longest])} ({kept[longest]['role']}), "
                         f"{len(kept[longest]['content']):,} characters). Shorten it, or raise --max_seq_length")
    ids, offsets = found[1:] if found and found[0] == text else encode(text)
    labels = assistant_labels(ids, offsets, spans, set(response_stop_ids(tokenizer, style)))
    if eos_after and kept[-1]["role"] == "assistant":  # generation can only stop at an id: the answer ends with EOS
        labels[-1] = ids[-1]
    if not mask_inputs:
        labels = list(ids)
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "truncated": truncated, "dropped_turns": len(exchanges) - fitting}


def assistant_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                     end_ids: set[int]) -> list[int]:
    """The ids of the tokens that start in an assistant span, up to and including its first end-of-turn token;
    IGNORE_INDEX elsewhere. One pass over the tokens (the spans are in order)."""
    labels, span, ended = [IGNORE_INDEX] * len(ids), 0, False
    for j, (token_start, _) in enumerate(offsets):
        while span < len(spans) and token_start >= spans[span][1]:
            span, ended = span + 1, False
        if span == len(spans):
            break
        if token_start >= spans[span][0] and not ended:
            labels[j] = ids[j]
            ended = ids[j] in end_ids  # the end of the turn: the model learns to stop here, and nothing after it
    return labels
