"""Conversations as training data: the text a chat style makes of them, and the loss on the assistant's turns only.

A conversation (messages of system, user and assistant) is rendered whole, as the model will read it at inference,
and encoded once. Which of its tokens carry loss is found from the text itself: a chat style writes a conversation's
beginning as the beginning of the whole (the same text, however many turns follow), so the assistant's turn i spans
from the end of the conversation up to turn i, rendered with the assistant's header (add_generation_prompt), to the
end of the conversation through turn i. Its tokens are those whose characters start in that span, up to and including
the first end-of-turn token (the style's end, or the tokenizer's stop tokens): the assistant's words and where it
stops, and nothing of the headers, the system prompt, the user, or what a template writes after the end-of-turn
token. This holds for any template that renders prefixes as prefixes, which is checked, not assumed.
"""

from typing import Optional

import torch

from lit_lora.prompts import render_chat, response_stop_ids, template_writes_bos
from lit_lora.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy skips them)


def assistant_spans(messages: list[dict], style: str, tokenizer: Tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text of the whole conversation, and the (start, end) characters of each assistant turn in it."""
    text = render_chat(messages, style, add_generation_prompt=False, tokenizer=tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], style, add_generation_prompt=True, tokenizer=tokenizer)
        through = render_chat(messages[:i + 1], style, add_generation_prompt=False, tokenizer=tokenizer)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"the {style} style does not write the beginning of a conversation as the beginning of "
                             "the whole conversation, so its assistant turns cannot be found in it")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(messages: list[dict], tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool = True,
                          style: str = "chat_template") -> Optional[dict]:
    """input_ids of the rendered conversation, and labels: the assistant turns' tokens (all tokens if not
    mask_inputs), -100 elsewhere. A conversation too long for max_seq_length first loses its earliest exchanges
    (a user turn and what follows it, up to the next user turn; a system turn stays), then, with one exchange left, is
    cut at max_seq_length. None when no assistant token is left to learn. `dropped_turns` counts the exchanges left
    out, `truncated` whether it was cut."""
    end_ids = set(response_stop_ids(tokenizer, style))
    dropped = 0
    while True:
        text, spans = assistant_spans(messages, style, tokenizer)
        ids, offsets = tokenizer.encode_with_offsets(text, bos=not template_writes_bos(style))
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(ids) <= max_seq_length or len(users) < 2:
            break
        messages = messages[:users[0]] + messages[users[1]:]  # the earliest exchange out; the system turn stays
        dropped += 1
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for j, (token_start, _) in enumerate(offsets):
            if start <= token_start < end:
                labels[j] = ids[j]
                if ids[j] in end_ids:  # the end of the turn: the model learns to stop here, and nothing after it
                    break
    if not mask_inputs:
        labels = list(ids)
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "truncated": truncated, "dropped_turns": dropped}
