"""Prompt styles: how an instruction (and its optional input) becomes the text the model reads.

Training, evaluation and every generate script use `format_prompt`, so a model never sees a prompt at inference
that it was not trained on: prepare_data/ records the style in prepare_config.json, finetuning evaluates in it,
and the generate scripts take it as --prompt_style.
"""

from typing import Callable, NamedTuple, Optional

from lit_lora.tokenizer import Tokenizer

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

# Llama 3 Instruct's chat format: the chat template of Meta-Llama-3-8B-Instruct applied to one user message with
# add_generation_prompt=True, less the leading <|begin_of_text|> (which `encode(bos=True)` adds). The template
# trims the message; the assistant's answer ends with <|eot_id|>. The templates of Llama 3.1 and 3.2 Instruct also
# put a system turn first ("Cutting Knowledge Date: December 2023", and for 3.2 today's date): left out here, so that
# a prompt, and data prepared with it, does not change with the day.
LLAMA3_PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")

# ChatML as SmolLM2-Instruct's chat template writes one user message with add_generation_prompt=True: with its
# default system message first, which the template adds to every conversation that has none. The answer ends with
# <|im_end|>.
CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")


def alpaca_prompt(instruction: str, input: str) -> str:
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_message(instruction: str, input: str) -> str:
    """The user's message in a chat format, which has no field for an input: the instruction, then a blank line
    and the input."""
    return f"{instruction}\n\n{input}" if input else instruction


def llama3_prompt(instruction: str, input: str) -> str:
    return LLAMA3_PROMPT.format(message=chat_message(instruction, input).strip())


def chatml_prompt(instruction: str, input: str) -> str:
    return CHATML_PROMPT.format(message=chat_message(instruction, input))


class PromptStyle(NamedTuple):
    prompt: Callable[[str, str], str]  # (instruction, input) -> the prompt, after which the response follows
    response_end: Optional[str]  # the text that ends a response; None: the tokenizer's EOS


PROMPT_STYLES = {
    "alpaca": PromptStyle(alpaca_prompt, response_end=None),  # any model, base or finetuned: the default
    "llama3": PromptStyle(llama3_prompt, response_end="<|eot_id|>"),  # Llama 3.x Instruct
    "chatml": PromptStyle(chatml_prompt, response_end="<|im_end|>"),  # SmolLM2-Instruct
}


def prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {name!r}: choose one of {', '.join(PROMPT_STYLES)} (lit_lora/prompts.py)")
    return PROMPT_STYLES[name]


def format_prompt(instruction: str, input: str = "", style: str = "alpaca") -> str:
    """The prompt for an instruction and its optional input, in a style of PROMPT_STYLES."""
    return prompt_style(style).prompt(instruction, input)


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
