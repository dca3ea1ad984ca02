"""Preference data for DPO (lit_lora/dpo.py): pairs of a better (chosen) and a worse (rejected) answer to one prompt.

The data path is instruction data's (lit_lora/data.py), twice per record: a record {prompt, chosen, rejected} is
tokenized as the example (prompt, chosen) and the example (prompt, rejected), each in the prompt style (or chat
template) the data are prepared in, with the loss on the answer's tokens only. Records come as strings (the prompt
is an instruction, formatted in the style) or as TRL's conversational format: `prompt` a list of messages, `chosen`
and `rejected` lists of the assistant's messages (or, with no `prompt`, two whole conversations that differ only at
their end: the prompt is the turns they share).

A pair too long for max_seq_length keeps the end of its prompt, the part the answers follow: the prompt's start is
dropped (BOS kept), down to max_prompt_length tokens at most, then the answers lose their ends (and the end of turn
the model would learn to stop at). The summary counts the pairs cut.
"""

import random
import time
from pathlib import Path
from typing import Optional, Union

import torch

from lit_lora.data import (
    IGNORE_INDEX,
    PREPARED_FILES,
    check_destination,
    check_records,
    read_prepare_config,
    tokenize_example,
    write_prepared,
)
from lit_lora.data_files import conversation, read_records
from lit_lora.files import load_torch_file
from lit_lora.prompts import prompt_style, render_chat, template_sha256, template_writes_bos
from lit_lora.tokenizer import Tokenizer, check_utf8

FIELDS = ("prompt", "chosen", "rejected")


def load_preference_records(path: Union[str, Path]) -> list[dict]:
    """Pairs from a JSON list or a JSONL file: {prompt, chosen, rejected} as three strings, or as messages (the
    prompt's turns, then the assistant's answer in each of chosen and rejected). A record that cannot be a pair (a
    missing field, an empty answer, chosen equal to rejected) is one error naming the file, the record and its line."""
    path = Path(path)
    return [preference_record(record, f"{path}, {where}") for where, record in read_records(path)]


def preference_record(record: object, where: str) -> dict:
    """One record checked, as {prompt, chosen, rejected}: three strings, or three lists of messages."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with the fields prompt, chosen and rejected, found "
                         f"{type(record).__name__}")
    if "prompt" not in record and all(isinstance(record.get(k), list) for k in ("chosen", "rejected")):
        record = implicit_prompt(record, where)
    missing = [key for key in FIELDS if key not in record]
    if missing:
        raise ValueError(f"{where}: missing the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; its "
                         f"fields are {sorted(record)}. A preference record is {{prompt, chosen, rejected}}")
    if all(isinstance(record[key], str) for key in FIELDS):
        for key in FIELDS:
            check_utf8(record[key], f"{where}: field {key!r}")
            if not record[key].strip():
                raise ValueError(f"{where}: the {key} is empty: give it its text, or remove the record")
        pair = {key: record[key] for key in FIELDS}
    elif all(isinstance(record[key], list) for key in FIELDS):
        pair = {key: conversation({"messages": record[key]}, f"{where}, {key}") for key in FIELDS}
        for key in ("chosen", "rejected"):
            if any(message["role"] != "assistant" for message in pair[key]):
                raise ValueError(f"{where}: every turn of {key} must be the assistant's (the answer to the prompt); "
                                 "the user's turns belong in prompt")
    else:
        kinds = {key: type(record[key]).__name__ for key in FIELDS}
        raise ValueError(f"{where}: prompt, chosen and rejected must be three strings or three lists of messages, "
                         f"found {kinds}")
    if pair["chosen"] == pair["rejected"]:
        raise ValueError(f"{where}: chosen and rejected are the same answer, so there is no preference to learn: "
                         "remove the record")
    return pair


def implicit_prompt(record: dict, where: str) -> dict:
    """TRL's implicit prompt: two whole conversations; the turns they share are the prompt."""
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(f"{where}: no prompt field, and chosen and rejected share no first turn to be the prompt: "
                         "give the record its prompt")
    return {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


# ---------------------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_pair(pair: dict, tokenizer: Tokenizer, max_seq_length: int, max_prompt_length: int, style: str,
                  system_prompt: Optional[str] = None) -> Optional[dict]:
    """{chosen, rejected}: each {input_ids, labels}, the loss on the answer's tokens only, both within
    max_seq_length (see the module docstring), and `cut`: whether the pair was cut. None when the prompt alone is
    over four contexts long (left out, and counted)."""
    room = 4 * max_seq_length  # tokenized whole first, then cut here (a longer prompt is left out)
    prompt_text = None
    examples = {}
    for answer in ("chosen", "rejected"):
        if isinstance(pair["prompt"], str):
            record = {"instruction": pair["prompt"], "output": pair[answer]}
        else:
            record = {"messages": pair["prompt"] + pair[answer]}
        example = tokenize_example(record, tokenizer, room, True, style, system_prompt)
        if example is None or example.get("dropped_turns"):
            return None
        if not isinstance(pair["prompt"], str):  # the prompt's own assistant turns carry no loss: mask up to the answer
            if prompt_text is None:
                system = [{"role": "system", "content": system_prompt}] if system_prompt and \
                    pair["prompt"][0]["role"] != "system" else []
                prompt_text = render_chat(system + pair["prompt"], style, True, tokenizer)
            prompt_ids = tokenizer.encode_with_offsets(prompt_text, bos=not template_writes_bos(style))[0]
            shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, example["input_ids"].tolist())) if a != b),
                          min(len(prompt_ids), len(example["input_ids"])))
            example["labels"][:shared] = IGNORE_INDEX
        examples[answer] = example
    cut = any(example["truncated"] for example in examples.values())
    prompt_length = min(first_label(example["labels"]) for example in examples.values())
    longest = max(len(example["input_ids"]) for example in examples.values())
    if longest > max_seq_length:  # the prompt's start goes first (as far as max_prompt_length), then the answers' ends
        cut = True
        bos = int(tokenizer.add_bos and int(examples["chosen"]["input_ids"][0]) == tokenizer.bos_id)
        drop = max(0, min(longest - max_seq_length, prompt_length - max_prompt_length))
        for example in examples.values():
            for key in ("input_ids", "labels"):
                kept = torch.cat([example[key][:bos], example[key][bos + drop:]])[:max_seq_length]
                example[key] = kept.clone()
    return {"chosen": {key: examples["chosen"][key] for key in ("input_ids", "labels")},
            "rejected": {key: examples["rejected"][key] for key in ("input_ids", "labels")}, "cut": cut}


def first_label(labels: torch.Tensor) -> int:
    """The position of the first token that carries loss: how long the prompt is."""
    return int((labels != IGNORE_INDEX).nonzero()[0])


def prepare_pairs(pairs: list[dict], args, tokenizer: Tokenizer, source: Union[str, Path],
                  source_sha256: Optional[str] = None) -> dict:
    """Shuffle, split, tokenize and write train.pt, test.pt (lists of {chosen, rejected}) and prepare_config.json
    (kind "preference"), all or nothing. `args`: PreferenceArgs. Returns the summary, also printed and saved."""
    start = time.perf_counter()
    destination = Path(args.destination_path)
    check_destination(destination)
    style = args.prompt_style
    if style is None:
        conversations = not isinstance(pairs[0]["prompt"], str)
        if conversations and tokenizer.chat_template is None:
            raise ValueError(f"{source} holds conversations, and {args.checkpoint_dir} has no chat template: choose "
                             "a chat style with --prompt_style llama3 or chatml")
        style = "chat_template" if conversations else "alpaca"
    prompt_style(style)
    max_prompt_length = args.max_prompt_length or args.max_seq_length // 2
    n = len(pairs)
    n_test = args.test_split_size if isinstance(args.test_split_size, int) else round(n * args.test_split_size)
    if not 0 <= n_test < n:
        raise ValueError(f"A test split of {args.test_split_size} leaves no training pairs out of {n} records: "
                         "make --test_split_size smaller")
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    prepared, cut, dropped = {"test": [], "train": []}, 0, 0
    for split, indices in (("test", order[:n_test]), ("train", order[n_test:])):
        for index in indices:
            try:
                tokenized = tokenize_pair(pairs[index], tokenizer, args.max_seq_length, max_prompt_length, style,
                                          args.system_prompt)
            except ValueError as error:  # a chat template that refuses the conversation, say
                raise ValueError(f"{source}, record {index}: {error}") from None
            if tokenized is None:
                dropped += 1
                continue
            cut += tokenized.pop("cut")
            prepared[split].append(tokenized)
    if not prepared["train"]:
        raise ValueError(f"No pair of {source} fits: every prompt is over {4 * args.max_seq_length} tokens "
                         f"({dropped} left out). Raise --max_seq_length")
    lengths = sorted(len(p[a]["input_ids"]) for p in prepared["train"] + prepared["test"] for a in ("chosen", "rejected"))
    summary = {
        "kind": "preference", "source": str(source), "source_sha256": source_sha256,
        "checkpoint_dir": str(args.checkpoint_dir), "max_seq_length": args.max_seq_length,
        "max_prompt_length": max_prompt_length, "seed": args.seed, "test_split_size": n_test, "prompt_style": style,
        "system_prompt": args.system_prompt,
        "chat_template_sha256": template_sha256(tokenizer.chat_template) if style == "chat_template" else None,
        "tokenizer_checksum": tokenizer.checksum(), "tokenizer_vocab_size": tokenizer.vocab_size,
        "train_pairs": len(prepared["train"]), "test_pairs": len(prepared["test"]), "cut": cut, "dropped": dropped,
        "length_min": lengths[0], "length_mean": round(sum(lengths) / len(lengths), 1), "length_max": lengths[-1],
    }
    write_prepared(destination, prepared, summary)
    print(f"Prepared {destination} in {time.perf_counter() - start:.1f} s: {summary['train_pairs']:,} train + "
          f"{summary['test_pairs']:,} test preference pairs ({style} style), {cut} cut to {args.max_seq_length} tokens "
          f"(the prompt's start, down to {max_prompt_length} tokens, then the answers' ends), {dropped} left out "
          f"(prompt far too long)\n  tokens per answer with its prompt: min {summary['length_min']}, "
          f"mean {summary['length_mean']}, max {summary['length_max']}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_pairs(data_dir: Union[str, Path], tokenizer: Optional[Tokenizer] = None) -> tuple[list, list, dict]:
    """train and test pairs and the preparation settings, every pair checked as instruction examples are
    (data.check_records): refuses pairs tokenized by another tokenizer, and pairs a run could not use."""
    data_dir = Path(data_dir)
    missing = [name for name in PREPARED_FILES if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"No prepared pairs in {data_dir} (missing {', '.join(missing)}). Prepare them "
                                f"first: python prepare_data/preference.py --data_file ... --destination_path {data_dir}")
    config = read_prepare_config(data_dir)
    if tokenizer is not None and config["tokenizer_checksum"] != tokenizer.checksum():
        raise ValueError(f"{data_dir} was prepared with another tokenizer ({config.get('checkpoint_dir')}), not "
                         f"{tokenizer.model_path}. Prepare it again with --checkpoint_dir set to the model you train.")
    hint = "prepare the pairs again with prepare_data/preference.py"
    splits = []
    for name in ("train.pt", "test.pt"):
        path = data_dir / name
        pairs = load_torch_file(path, "prepared preference pairs", hint)
        if not isinstance(pairs, list) or not all(isinstance(p, dict) and {"chosen", "rejected"} <= set(p)
                                                  for p in pairs):
            raise ValueError(f"{path} holds no list of {{chosen, rejected}} pairs: {hint}")
        for i, pair in enumerate(pairs):
            check_records([pair["chosen"], pair["rejected"]], Path(f"{path}, pair {i}"),
                          tokenizer.vocab_size if tokenizer is not None else None, hint)
        splits.append(pairs)
    if not splits[0]:
        raise ValueError(f"{data_dir / 'train.pt'} holds no pairs: {hint}")
    return splits[0], splits[1], config
