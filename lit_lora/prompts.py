"""Prompt styles: how an instruction, or a conversation, becomes the text the model reads.

Training, evaluation and every generate script use the functions here, so a model never sees a prompt at inference
that it was not trained on: prepare_data/ records the style in prepare_config.json, finetuning evaluates in it and
records it in what it writes (the LoRA file, the adapter file, a full finetune's model_config.json), and the generate
scripts use the recorded style.

- alpaca: Alpaca-LoRA's template, for any model, base or finetuned: one instruction (with an optional input) and
  one answer. It is the course's example of a prompt format: read it below.
- llama3, chatml: the chat formats of Llama 3.x Instruct and SmolLM2-Instruct, written out by hand.
- chat_template: the checkpoint's own chat template (its Jinja text, `Tokenizer.chat_template`), rendered as
  transformers' apply_chat_template renders it: any instruct model's format, exactly, with no hand-written copy.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}, the layout of
OpenAI's API and of most chat datasets.
"""

import hashlib
from typing import Callable, NamedTuple, Optional

import torch

from lit_lora.chat_template import MAX_RENDERED_CHARS, TooLongForContext, render_chat_template
from lit_lora.tokenizer import Tokenizer, check_utf8

# The prompt template of Alpaca-LoRA (tloen/alpaca-lora, templates/alpaca.json): Stanford Alpaca's template
# (Taori et al., 2023, tatsu-lab/stanford_alpaca) with a newline after "### Response:", so that the response
# starts on a line of its own; Stanford's prompt ends at the colon. The response ends with the tokenizer's EOS.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str) -> str:
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# Llama 3 Instruct's chat format: the chat template of Meta-Llama-3-8B-Instruct, less the leading <|begin_of_text|>
# (which `encode(bos=True)` adds). The template trims each message; a turn ends with <|eot_id|>. The templates of
# Llama 3.1 and 3.2 Instruct also put a system turn first ("Cutting Knowledge Date: December 2023", and for 3.2
# today's date): left out here, so that a prompt, and data prepared with it, does not change with the day
# (--prompt_style chat_template renders a checkpoint's own template, date and all).
def llama3_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                    for m in messages)
    return turns + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


# ChatML as SmolLM2-Instruct's chat template writes it: with its default system message first, which the template
# adds to every conversation that has none. A turn ends with <|im_end|>.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM_PROMPT}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class PromptStyle(NamedTuple):
    chat: Optional[Callable[[list[dict], bool], str]]  # (messages, add_generation_prompt) -> text; None: alpaca
    response_end: Optional[str]  # the text that ends a response; None: the tokenizer's stop tokens (EOS)


PROMPT_STYLES = {
    "alpaca": PromptStyle(None, response_end=None),  # any model, base or finetuned: the default
    "llama3": PromptStyle(llama3_chat, response_end="<|eot_id|>"),  # Llama 3.x Instruct
    "chatml": PromptStyle(chatml_chat, response_end="<|im_end|>"),  # SmolLM2-Instruct
    "chat_template": PromptStyle(None, response_end=None),  # the checkpoint's own (render_chat_template)
}


def prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {name!r}: choose one of {', '.join(PROMPT_STYLES)} (lit_lora/prompts.py)")
    return PROMPT_STYLES[name]


def chat_message(instruction: str, input: str) -> str:
    """The user's message in a chat format, which has no field for an input: the instruction, then a blank line
    and the input."""
    return f"{instruction}\n\n{input}" if input else instruction


def render_chat(messages: list[dict], style: str, add_generation_prompt: bool,
                tokenizer: Optional[Tokenizer] = None, max_chars: int = MAX_RENDERED_CHARS) -> str:
    """A conversation as the text of a chat style (not alpaca, which has one instruction and one answer);
    chat_template needs the tokenizer, whose template it renders (lit_lora/chat_template.py). A text over max_chars
    (CHARS_PER_TOKEN per token of the context it is for) is TooLongForContext, before anything tokenizes it."""
    for message in messages:  # a system prompt given or recorded, a line typed: named before a tokenizer meets it
        check_utf8(message["content"], f"The {message['role']} turn")
    if style == "chat_template":
        if tokenizer is None or tokenizer.chat_template is None:
            where = tokenizer.model_path.parent if tokenizer is not None else "the checkpoint"
            raise ValueError(f"{where} has no chat template (chat_template.jinja, or chat_template in "
                             "tokenizer_config.json): choose one of the styles alpaca, llama3, chatml")
        return render_chat_template(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.special_tokens,
                                    tokenizer.chat_template_file, max_chars)
    chat = prompt_style(style).chat
    if chat is None:
        raise ValueError(f"The {style} style is one instruction and one answer, not a conversation of several "
                         "turns or with a system prompt: use a chat style (chat_template, llama3, chatml)")
    text = chat(messages, add_generation_prompt)
    if len(text) > max_chars:
        raise TooLongForContext(f"the conversation in the {style} style is over {max_chars:,} characters: more than "
                                "the context can hold")
    return text


def format_prompt(instruction: str, input: str = "", style: str = "alpaca", tokenizer: Optional[Tokenizer] = None,
                  system_prompt: Optional[str] = None, max_chars: int = MAX_RENDERED_CHARS) -> str:
    """The prompt for one instruction and its optional input, in a style of PROMPT_STYLES (chat styles: a
    conversation of one user message, after the system prompt if given)."""
    if prompt_style(style).chat is None and style != "chat_template":
        if system_prompt:
            raise ValueError(f"The {style} style has no system turn: leave the system prompt out, or use a chat style")
        return alpaca_prompt(instruction, input)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return render_chat([*system, {"role": "user", "content": chat_message(instruction, input)}], style, True, tokenizer,
                       max_chars)


def template_writes_bos(style: str) -> bool:
    """Whether the rendered text itself holds BOS where the model wants it (a checkpoint's own template writes
    bos_token), so that it is encoded without adding one; the other styles rely on encode(bos=True)."""
    return style == "chat_template"


def encode_prompt(tokenizer: Tokenizer, text: str, style: Optional[str] = None) -> torch.Tensor:
    """The ids of a prompt as training read it: a checkpoint's own chat template writes its special tokens, BOS
    included, as text (read as those tokens); every other prompt is encoded after BOS where the model wants one."""
    if style == "chat_template":
        return torch.tensor(tokenizer.encode_with_offsets(text, bos=False)[0], dtype=torch.long)
    return tokenizer.encode(text, bos=True)


def single_token_id(tokenizer: Tokenizer, text: str) -> Optional[int]:
    """The id of `text` if the tokenizer reads it as one token (a special token such as <|eot_id|> of a Llama 3
    tokenizer.json), else None (the same text with a SentencePiece model: several ordinary pieces)."""
    ids = tokenizer.encode(text, bos=False).tolist()
    return ids[0] if len(ids) == 1 else None


def response_stop_ids(tokenizer: Tokenizer, style: str = "alpaca") -> tuple[int, ...]:
    """The ids that end an answer in `style`: the tokenizer's stop ids, and the style's end of response where it is
    one token (Llama 3 base's tokenizer does not stop at <|eot_id|>, a model finetuned in the llama3 style must)."""
    end = prompt_style(style).response_end
    end_id = None if end is None else single_token_id(tokenizer, end)
    return tuple(tokenizer.stop_ids) + ((end_id,) if end_id is not None and end_id not in tokenizer.stop_ids else ())


def template_sha256(template: Optional[str]) -> Optional[str]:
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()
