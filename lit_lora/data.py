"""Instruction data: preparing datasets, checking them when they are loaded, and batching them for training.

The data path: JSON/JSONL records {instruction, input, output} (read by lit_lora/data_files.py) -> a prompt
style (lit_lora/prompts.py; the Alpaca-LoRA template by default) -> tokens, with the prompt's labels masked to -100 so the loss is on
the response only -> data/<name>/{train,test}.pt -> every optimizer step's examples, a function of (seed, step)
-> right-padded micro batches in the training loop.
"""

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from lit_lora.cli import check_flag
from lit_lora.conversations import IGNORE_INDEX, tokenize_conversation
from lit_lora.files import atomic_folder, load_torch_file, read_json
from lit_lora.prompts import PROMPT_STYLES, chat_message, format_prompt, prompt_style, template_sha256
from lit_lora.tokenizer import Tokenizer, check_utf8


def prepared_prompt_format(data_dir: Union[str, Path]) -> dict:
    """The prompt format a prepared dataset was made in: its style (alpaca for data prepared before there were
    styles), system prompt and, for chat_template, the template's sha256. What a finetune records and generates in."""
    config = read_prepare_config(data_dir)
    return {"style": config.get("prompt_style", "alpaca"), "system_prompt": config.get("system_prompt"),
            "chat_template_sha256": config.get("chat_template_sha256")}


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and preparing

PROGRESS_SECONDS = 10.0  # how often a preparation says how far it is


def tokenize_example(record: dict, tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool = True,
                     style: str = "alpaca", system_prompt: Optional[str] = None) -> Optional[dict]:
    """An instruction record {instruction, input, output} in the alpaca style: BOS + prompt + response + EOS as
    input_ids; labels equal, with the prompt set to -100 if mask_inputs. In a chat style (llama3, chatml,
    chat_template) a record is a conversation: {messages}, or an instruction record as the conversation of one
    exchange (its user turn, the instruction and input, then the answer), tokenized by lit_lora/conversations.py
    with the loss on every assistant turn: one path and one rule for both.

    Prompt and response are encoded as one text, exactly as the model will read them, and the prompt alone
    tells how many tokens to mask. A too-long example is cut at max_seq_length: it loses the end of its
    response and its EOS. EOS is where the model learns to stop, so it belongs only after a whole answer: a cut
    answer followed by EOS would teach the model to stop in the middle of a sentence, or a word (Lit-LLaMA
    and Alpaca-LoRA also add EOS only when the whole response fits). An example whose prompt leaves no room
    for a response token is dropped (None): it would have nothing to learn.

    BOS comes first only where the model reads texts so (`tokenizer.add_bos`).
    """
    if "messages" in record or style == "chat_template" or prompt_style(style).chat is not None:
        messages = record.get("messages") or [{"role": "user", "content": chat_message(record["instruction"],
                                                                                       record.get("input", ""))},
                                               {"role": "assistant", "content": record["output"]}]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return tokenize_conversation(messages, tokenizer, max_seq_length, mask_inputs, style)
    prompt = format_prompt(record["instruction"], record.get("input", ""), style, system_prompt=system_prompt)
    prompt_length = len(tokenizer.encode(prompt, bos=True, eos=False))
    if prompt_length >= max_seq_length:
        return None
    input_ids = tokenizer.encode(prompt + record["output"], bos=True, eos=True)
    truncated = len(input_ids) > max_seq_length
    if truncated:  # the cut example simply ends at max_seq_length, without EOS
        input_ids = input_ids[:max_seq_length].clone()  # a copy: torch.save of a slice would save all its tokens
    labels = input_ids.clone()
    if mask_inputs:
        labels[:prompt_length] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def prepare(records: list[dict], tokenizer: Tokenizer, destination_path: Union[str, Path], max_seq_length: int,
            test_split_size: Union[int, float] = 0.1, seed: int = 42, mask_inputs: bool = True,
            source: Union[str, Path] = "", checkpoint_dir: Union[str, Path] = "",
            source_sha256: Optional[str] = None, style: str = "alpaca", system_prompt: Optional[str] = None) -> dict:
    """Shuffle, split, tokenize and write train.pt, test.pt and prepare_config.json, all or nothing.

    test_split_size is a count of examples (an int, e.g. 2000) or a fraction (a float below 1, e.g. 0.1).
    source and source_sha256 (the data file and its checksum) are recorded, to tell later what was prepared, and the
    prompt: its style, system prompt and, for chat_template, the template's sha256 (finetuning evaluates in it,
    records it, and generation uses it). A conversation whose last turn is not the assistant's has nothing to learn
    from: it is left out, and counted.
    Returns the summary that is also printed and saved in prepare_config.json.
    """
    start = time.perf_counter()
    check_destination(Path(destination_path))  # before the work, not after it
    prompt_style(style)  # an unknown style: before the work too
    n = len(records)
    n_test = test_split_size if isinstance(test_split_size, int) else round(n * test_split_size)
    if not 0 <= n_test < n:
        raise ValueError(f"A test split of {test_split_size} leaves no training examples out of {n} records: "
                         "make --test_split_size smaller")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    splits = {"test": [(i, records[i]) for i in order[:n_test]], "train": [(i, records[i]) for i in order[n_test:]]}

    prepared, dropped, truncated, no_answer, dropped_turns = {}, 0, 0, 0, 0
    done, shown = 0, time.perf_counter()
    for split, split_records in splits.items():
        prepared[split] = []
        for index, record in split_records:
            if time.perf_counter() - shown >= PROGRESS_SECONDS:  # a long preparation says how far it is
                print(f"  tokenized {done:,} of {n:,} records ({100 * done / n:.0f}%)", file=sys.stderr, flush=True)
                shown = time.perf_counter()
            done += 1
            if "messages" in record and record["messages"][-1]["role"] != "assistant":
                no_answer += 1
                continue
            try:
                example = tokenize_example(record, tokenizer, max_seq_length, mask_inputs, style, system_prompt)
            except ValueError as error:  # a chat template that refuses the conversation, say
                raise ValueError(f"{source}, record {index}: {error}") from None
            if example is None:
                dropped += 1
                continue
            truncated += example.pop("truncated")
            dropped_turns += example.pop("dropped_turns", 0)
            prepared[split].append(example)
    kept = prepared["train"] + prepared["test"]
    if not prepared["train"]:
        raise ValueError(nothing_to_train_message(tokenizer, max_seq_length, dropped, no_answer, system_prompt))
    lengths = sorted(len(e["input_ids"]) for e in kept)
    loss_tokens = sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in kept)
    summary = {
        "source": str(source), "source_sha256": source_sha256, "checkpoint_dir": str(checkpoint_dir),
        "max_seq_length": max_seq_length, "mask_inputs": mask_inputs, "seed": seed, "test_split_size": n_test,
        "prompt_style": style, "system_prompt": system_prompt,
        "chat_template_sha256": template_sha256(tokenizer.chat_template) if style == "chat_template" else None,
        "tokenizer_checksum": tokenizer.checksum(), "tokenizer_vocab_size": tokenizer.vocab_size,
        "train_examples": len(prepared["train"]), "test_examples": len(prepared["test"]),
        "dropped": dropped, "truncated": truncated, "no_answer": no_answer, "dropped_turns": dropped_turns,
        "length_min": lengths[0], "length_mean": round(sum(lengths) / len(lengths), 1),
        "length_p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "length_max": lengths[-1],
        "loss_token_share": round(loss_tokens / sum(lengths), 4),
    }
    write_prepared(Path(destination_path), prepared, summary)
    print(f"Prepared {destination_path} in {time.perf_counter() - start:.1f} s: "
          f"{summary['train_examples']:,} train + {summary['test_examples']:,} test examples kept, "
          f"{dropped} dropped (prompt too long), {truncated} truncated (response cut, no EOS)"
          + (f", {no_answer} conversations without a last answer left out, {dropped_turns} earliest exchanges left out "
             "of conversations too long" if no_answer or dropped_turns else "") + "\n"
          f"  tokens per example: min {summary['length_min']}, mean {summary['length_mean']}, "
          f"p95 {summary['length_p95']}, max {summary['length_max']}; "
          f"{100 * summary['loss_token_share']:.1f}% of tokens carry loss")
    if not prepared["test"]:
        print(no_test_split_message(test_split_size, n, n_test))
    return summary


def nothing_to_train_message(tokenizer: Tokenizer, max_seq_length: int, dropped: int, no_answer: int,
                             system_prompt: Optional[str]) -> str:
    """Why no training example is left: no conversation with an answer, a system prompt that fills the context
    alone, or prompts too long."""
    if no_answer and not dropped:
        return (f"none of the {no_answer} conversations ends with an assistant turn: the last turn is the answer the "
                "model learns to write, so a conversation without one has nothing to learn. Give each its answer")
    system_length = len(tokenizer.encode(system_prompt, bos=False)) if system_prompt else 0
    if system_length >= max_seq_length:
        return (f"the system prompt alone (--system_prompt) is {system_length} tokens, and "
                f"max_seq_length={max_seq_length}: no turn fits after it. Shorten it, or raise --max_seq_length")
    return f"No training example fits in max_seq_length={max_seq_length} ({dropped} dropped): raise --max_seq_length"


def no_test_split_message(test_split_size: Union[int, float], n_records: int, n_test: int) -> str:
    """What an empty test split means, and, unless the user asked for none, why it is empty."""
    meaning = ("finetuning will have no held-out examples for its validation loss (which will read 0.0000, "
               "measuring nothing)")
    if test_split_size == 0:
        return f"No test split (--test_split_size 0): {meaning}."
    if n_test == 0:
        return (f"Warning: --test_split_size {test_split_size} of {n_records} records rounds to 0 examples: no test "
                f"split, so {meaning}. Hold out a count instead (--test_split_size 1 or more) or a larger fraction.")
    return (f"Warning: all {n_test} test examples were dropped (prompt too long): no test split, so {meaning}. "
            "Raise --max_seq_length.")


PREPARED_FILES = ("train.pt", "test.pt", "prepare_config.json")


def check_destination(destination: Path) -> None:
    """Refuse a destination that prepare cannot replace as a whole folder, before any work is done."""
    if destination.is_symlink():
        raise FileExistsError(
            f"--destination_path {destination} is a symbolic link (to {destination.resolve()}): prepare replaces "
            "the whole folder, so it would replace the link, not write into its target. Give the target folder "
            "itself, or a new path")
    for path in (destination, *destination.parents):
        if path.exists() and not path.is_dir():
            raise FileExistsError(
                f"--destination_path {destination}: {path} is a file, not a folder, and prepare writes a folder "
                f"({', '.join(PREPARED_FILES)}) there. Choose another path, or move the file away")
    if destination.is_dir():
        foreign = sorted(p.name for p in destination.iterdir() if p.name not in PREPARED_FILES)
        if foreign:
            raise FileExistsError(f"--destination_path {destination} holds files that prepare did not write "
                                  f"({foreign[:3]}); prepare replaces the whole folder, so choose an empty or new one")


def write_prepared(destination: Path, prepared: dict, summary: dict) -> None:
    """Write into a temporary folder beside the destination, then swap it in: never a half-written dataset.

    An existing dataset is swapped out by renaming, not deleted first (atomic_folder with replace=True), so a
    complete dataset exists at every moment: a crash in the middle of the swap leaves the old one in the
    hidden folder .NAME.old-*, beside the destination.
    """
    check_destination(destination)
    with atomic_folder(destination, replace=True) as tmp:
        torch.save(prepared["train"], tmp / "train.pt")
        torch.save(prepared["test"], tmp / "test.pt")
        (tmp / "prepare_config.json").write_text(json.dumps(summary, indent=2))


def load_prepared(data_dir: Union[str, Path], tokenizer: Optional[Tokenizer] = None) -> tuple[list, list, dict]:
    """train, test and the preparation settings, every record checked when the data are loaded (not when an example
    is sampled, hours later): refuses data tokenized by another tokenizer, and records a run could not use."""
    data_dir = Path(data_dir)
    files = [data_dir / name for name in PREPARED_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"No prepared data in {data_dir} (missing {', '.join(missing)}). Prepare it first, e.g. "
            f"`python prepare_data/alpaca.py --destination_path {data_dir}` (see howto/prepare_dataset.md)."
        )
    config = read_prepare_config(data_dir)
    if tokenizer is not None and config["tokenizer_checksum"] != tokenizer.checksum():
        raise ValueError(
            f"{data_dir} was prepared with another tokenizer ({config.get('checkpoint_dir') or 'unknown'}), not "
            f"{tokenizer.model_path}. Prepare it again with --checkpoint_dir set to the model you finetune."
        )
    vocab_size = tokenizer.vocab_size if tokenizer is not None else None
    hint = "prepare the data again (see howto/prepare_dataset.md)"
    train, test = (check_records(load_torch_file(path, "prepared examples", hint), path, vocab_size, hint)
                   for path in files[:2])
    if not train:
        raise ValueError(f"{files[0]} holds no examples: {hint}")
    return train, test, config


def read_prepare_config(data_dir: Union[str, Path]) -> dict:
    """prepare_config.json, with the fields finetuning reads checked."""
    path, hint = Path(data_dir) / "prepare_config.json", "prepare the data again (see howto/prepare_dataset.md)"
    config = read_json(path, hint)
    for field, kind in (("tokenizer_checksum", str), ("max_seq_length", int)):
        if not isinstance(config.get(field), kind):
            raise ValueError(f"{path}: {field} is {config.get(field)!r}, not a {kind.__name__}: {hint}")
    if config.get("prompt_style", "alpaca") not in PROMPT_STYLES:  # alpaca: data prepared before there were styles
        raise ValueError(f"{path}: prompt_style {config['prompt_style']!r} is not one of {', '.join(PROMPT_STYLES)}: "
                         f"{hint}")
    return config


def check_records(records: object, path: Path, vocab_size: Optional[int], hint: str) -> list:
    """Every record of a train.pt or test.pt: input_ids and labels, 1-D integer tensors of one length, ids within
    the vocabulary (labels: the same ids, or IGNORE_INDEX where no loss is taken)."""
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a {type(records).__name__}, not a list of examples: {hint}")
    for i, record in enumerate(records):
        ids, labels = (record.get(key) if isinstance(record, dict) else None for key in ("input_ids", "labels"))
        if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.long for t in (ids, labels)):
            raise ValueError(f"{path}, record {i}: expected input_ids and labels, 1-D integer tensors: {hint}")
        top = vocab_size if vocab_size is not None else torch.iinfo(torch.long).max
        labelled = labels[labels != IGNORE_INDEX]
        problem = ("input_ids and labels differ in length" if len(ids) != len(labels) else "it is empty" if not len(ids)
                   else "a token id is outside the vocabulary" if ids.min() < 0 or ids.max() >= top
                   or (len(labelled) and (labelled.min() < 0 or labelled.max() >= top)) else None)
        if problem:
            raise ValueError(f"{path}, record {i}: {problem} (vocabulary: {vocab_size or 'unknown'} tokens): {hint}")
    return records


# The smallest --max_seq_length accepted. An example is BOS + the template's own text (140 characters around
# an empty instruction: 31 tokens with the 4,000-token tokenizer of howto/prepare_dataset.md) + the instruction
# + at least one response token, so a limit under 16 holds no example with any subword tokenizer of the usual
# sizes: it is a slip of the keyboard. Whether a larger limit fits your prompts is told once they are tokenized
# (the summary counts the dropped examples; none fitting is an error).
MIN_MAX_SEQ_LENGTH = 16


@dataclass
class PrepareArgs:
    """Options shared by the prepare_data/ scripts (each script sets its dataset's defaults).

    Args:
        data_file: A local copy of the data; when not given, the script downloads it (json_data.py requires it).
        checkpoint_dir: The model folder whose tokenizer (tokenizer.model or tokenizer.json) tokenizes the data.
        destination_path: Where train.pt, test.pt and prepare_config.json go.
        max_seq_length: Tokens per example at most (16 or more). Longer examples are cut: they lose the end of
            their response and its EOS; examples whose prompt alone leaves no room for a response token are dropped.
        test_split_size: Examples held out for validation: a count (2000, 0 for none) or a fraction below 1 (0.1).
        seed: Seeds the shuffle before the split (0 or more).
        mask_inputs: Set the prompt's labels to -100, so the loss is on the response only.
        prompt_style: The prompt format: alpaca (Alpaca-LoRA's template, any model), chat_template (the checkpoint's
            own chat template), llama3 (Llama 3.x Instruct's chat format) or chatml (SmolLM2-Instruct's); null:
            chat_template for conversations (alpaca for instruction records). Finetuning evaluates in it and records it;
            the generate scripts use the recorded style.
        system_prompt: A system turn put first in every example that has none (chat styles); null: none (a template
            may write its own default, as SmolLM2's does).
    """

    data_file: Optional[Path] = None
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf")  # what README's download and convert_hf commands create
    destination_path: Path = Path("data/alpaca")
    max_seq_length: int = 256
    test_split_size: Union[int, float] = 0.1
    seed: int = 42
    mask_inputs: bool = True
    prompt_style: Optional[str] = None
    system_prompt: Optional[str] = None

    def __post_init__(self):
        check_flag(self, "max_seq_length", self.max_seq_length >= MIN_MAX_SEQ_LENGTH,
                   f"must be at least {MIN_MAX_SEQ_LENGTH} tokens, room for a prompt and a response")
        if isinstance(self.test_split_size, float):
            check_flag(self, "test_split_size", 0 <= self.test_split_size < 1,
                       "a fraction must be at least 0 and below 1 (0.1 holds out 10%); a whole number is a count")
        else:
            check_flag(self, "test_split_size", self.test_split_size >= 0, "a count of examples must be 0 or more")
        check_flag(self, "seed", self.seed >= 0, "must be 0 or more")
        check_flag(self, "prompt_style", self.prompt_style is None or self.prompt_style in PROMPT_STYLES,
                   f"is not a prompt style; choose one of {', '.join(PROMPT_STYLES)} (see lit_lora/prompts.py)")
        check_flag(self, "system_prompt", not self.system_prompt or self.prompt_style != "alpaca",
                   "the alpaca style has no system turn: leave --system_prompt out, or choose a chat style")
        check_utf8(self.system_prompt or "", "--system_prompt")


def prepare_records(records: list[dict], args: PrepareArgs, tokenizer: Tokenizer, source: Union[str, Path],
                    source_sha256: Optional[str] = None) -> dict:
    """What every prepare_data/ script ends with: tokenize with the checkpoint's tokenizer (which the script
    reads first, before any download) and write."""
    conversations = any("messages" in record for record in records)
    style = args.prompt_style
    if style is None and conversations:
        if tokenizer.chat_template is None:
            raise ValueError(f"{source} holds conversations, and {args.checkpoint_dir} has no chat template: choose "
                             "a chat style with --prompt_style llama3 or chatml")
        style = "chat_template"
    return prepare(records, tokenizer, args.destination_path, args.max_seq_length, args.test_split_size, args.seed,
                   args.mask_inputs, source, args.checkpoint_dir, source_sha256, style or "alpaca", args.system_prompt)


# ---------------------------------------------------------------------------------------------------------
# Batching


def global_batch_indices(step: int, num_examples: int, global_batch_size: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: consecutive slices of a stream that is a fresh shuffle of the
    training set each epoch (every example once per epoch, no sampling with replacement). A pure function
    of (step, seed): resuming at a step needs no saved data order."""
    start = step * global_batch_size
    orders: dict[int, torch.Tensor] = {}
    indices = []
    for position in range(start, start + global_batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in orders:
            orders[epoch] = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


def collate(examples: list[dict], max_seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a micro batch to its longest example: (B, T) input_ids (pad 0) and labels (pad -100).

    Right padding needs no attention mask: causal attention never looks forward, so real tokens never
    see the padding after them, and the padding's labels carry no loss.
    """
    length = min(max(len(e["input_ids"]) for e in examples), max_seq_length)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"][:length]
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = example["labels"][:length]
    return input_ids, labels


def pack(examples: list[dict], max_seq_length: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A micro batch as one row, its examples end to end: (1, N) input_ids and labels, N the sum of their lengths,
    and those lengths, which the model needs to keep each example's positions and attention to itself.

    The same label tokens as `collate`, none of its padding: a right-padded batch of examples of 90 and 250
    tokens computes 2 x 250 positions, this row 340. The first token of each example gets no label (-100): it
    would be the target of the previous example's last position, which in a padded row predicts nothing.
    """
    rows = [(e["input_ids"][:max_seq_length], e["labels"][:max_seq_length]) for e in examples]
    first = torch.tensor([IGNORE_INDEX])
    input_ids = torch.cat([torch.as_tensor(ids) for ids, _ in rows]).unsqueeze(0)  # (1, N)
    labels = torch.cat([torch.cat([first, torch.as_tensor(labels[1:])]) for _, labels in rows]).unsqueeze(0)
    return input_ids, labels, [len(ids) for ids, _ in rows]

