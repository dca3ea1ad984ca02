"""What the evaluate scripts share: their flags, and the evaluations that need no harness: the loss on a prepared
test split (with greedy answers scored against the references), and the perplexity of a plain text.

The harness's tasks (lit_lora/evaluate.py) and these run on the same model, loaded as the generate scripts load it.
"""

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_lora.chat import prepare_for_generation
from lit_lora.cli import check_flag, config_flags
from lit_lora.data import IGNORE_INDEX, collate, load_prepared, read_prepare_config
from lit_lora.dpo import sequence_log_probs
from lit_lora.evaluate import generate_texts, prefix_token_id, rolling_windows, run_harness, score_continuations
from lit_lora.evaluate import write_results
from lit_lora.files import atomic_write, read_json
from lit_lora.model import LLaMA
from lit_lora.preference import load_pairs
from lit_lora.prompts import response_stop_ids
from lit_lora.quantize import check_quantize
from lit_lora.tokenizer import Tokenizer, check_utf8
from lit_lora.train import loss_sum


@dataclass
class EvaluateArgs:
    """Options shared by every evaluate script (each script adds what its method needs). Give at least one of
    --tasks, --data_dir, --text_file.

    Args:
        checkpoint_dir: Folder with lit_model.pth, model_config.json and the tokenizer.
        tasks: lm-eval-harness tasks, comma-separated (hellaswag,arc_easy); `lm-eval ls tasks` lists them. Needs
            pip install -e '.[eval]'.
        include_path: A folder of your own task YAML files (and their local data) for --tasks.
        num_fewshot: Examples put before each question (null: the task's own number).
        limit: At most this many examples per task (a number from 0 to 1: that fraction); null: all of them.
        batch_size: Sequences scored or generated together.
        apply_chat_template: Put each task's prompts in the checkpoint's chat template (chat models).
        output_path: Write the results here as JSON (the harness's: lm-eval's own layout), whole or not at all.
        data_dir: A prepared data folder (prepare_data/*): the loss and perplexity over the response tokens of its
            whole test split.
        generate: With --data_dir: also answer each test example greedily and score the answers against the
            references (exact match after normalising case, spaces and a final period).
        answer_pattern: With --generate: a regular expression that finds the final answer in an answer and in its
            reference (its first group, if it has one), e.g. GSM8K's '#### (\\-?[0-9.,]+)'; numbers compare as numbers;
            empty: the whole answer.
        max_new_tokens: With --generate: the longest answer.
        text_file: A UTF-8 text file: its perplexity, in windows of the model's context.
        precision: Weights' precision: 32-true, bf16-true or 16-true; default bf16-true on a GPU that supports it, else
            32-true.
        quantize: Store the Blocks' weights in 4 bits (bnb.nf4, bnb.nf4-dq); null: in the precision's dtype.
    """

    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf")
    tasks: Optional[str] = None
    include_path: Optional[Path] = None
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: int = 8
    apply_chat_template: bool = False
    output_path: Optional[Path] = None
    data_dir: Optional[Path] = None
    generate: bool = False
    answer_pattern: str = ""  # a str, not Optional[str]: the parser would read '#### ...' as a YAML comment, null
    max_new_tokens: int = 256
    text_file: Optional[Path] = None
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None
    quantize: Optional[str] = None

    def __post_init__(self):
        """Refuse a value that means nothing while the flags are parsed, before the model is loaded."""
        if not (self.tasks or self.data_dir or self.text_file):
            raise ValueError("nothing to evaluate: give --tasks, --data_dir or --text_file")
        check_flag(self, "limit", self.limit is None or self.limit > 0,
                   "must be above 0: a number of examples per task, or a fraction up to 1 (null: all)")
        check_flag(self, "num_fewshot", self.num_fewshot is None or self.num_fewshot >= 0, "must be 0 or more")
        check_flag(self, "batch_size", self.batch_size >= 1, "must be at least 1")
        check_flag(self, "max_new_tokens", self.max_new_tokens >= 1, "must be at least 1")
        check_flag(self, "generate", not self.generate or self.data_dir, "needs --data_dir (its test split)")
        check_flag(self, "include_path", self.include_path is None or self.tasks, "needs --tasks (the tasks to run)")
        check_flag(self, "answer_pattern", not self.answer_pattern or self.generate,
                   "needs --generate true (it scores generated answers)")
        if self.answer_pattern:
            try:
                re.compile(self.answer_pattern)
            except re.error as error:
                check_flag(self, "answer_pattern", False, f"is not a regular expression ({error})")
        check_flag(self, "output_path", self.output_path is None or not Path(self.output_path).is_dir(),
                   "is a folder: give the path of the JSON file to write")
        with config_flags():
            check_quantize(self.quantize)


def run_evaluation(model: LLaMA, args: EvaluateArgs, merge: bool = False) -> dict:
    """What every evaluate script does once its model is built: the test split, the text, the harness's tasks, as
    asked; each printed, and all written to --output_path at the end."""
    model = prepare_for_generation(model, args.precision, merge=merge, fused=False)  # the layers of model.py
    tokenizer = Tokenizer(args.checkpoint_dir)
    results: dict = {}
    # the quick ones first: a bad --data_dir or --text_file is said before the harness's tasks take their time
    if args.data_dir is not None:
        results["test_split"] = evaluate_test_split(model, tokenizer, args)
        split = results["test_split"]
        line = (f"{args.data_dir} test split ({split['examples']} examples, {split['response_tokens']:,} response "
                f"tokens): loss {split['loss']:.4f}, perplexity {split['perplexity']:.2f}") if "loss" in split else (
            f"{args.data_dir} test split ({split['pairs']} preference pairs): the chosen answer is the likelier in "
            f"{split['preferred']} ({100 * split['accuracy']:.0f}%), log-probability margin "
            f"log p(chosen) - log p(rejected) {split['margin']:.3f} on average")
        if args.generate:
            right = sum(answer["correct"] for answer in split["generated"])
            line += f"; greedy answers right: {right} of {split['answers']} (exact match {split['exact_match']:.3f})"
        print(line)
    if args.text_file is not None:
        results["text_file"] = text_perplexity(model, tokenizer, args.text_file, args.batch_size)
        text = results["text_file"]
        print(f"{args.text_file} ({text['tokens']:,} tokens, {text['windows']} window(s) of at most "
              f"{model.config.block_size}): loss {text['loss']:.4f}, perplexity {text['perplexity']:.2f}")
    task_names = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if task_names:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        harness = run_harness(model, tokenizer, task_names, args.include_path, args.num_fewshot, limit,
                              args.batch_size, args.apply_chat_template)
        from lm_eval.utils import make_table

        print(make_table(harness))
        results = {**harness, **results}  # lm-eval's layout, with this run's own figures beside its keys
    if args.output_path is not None:
        write_results(results, args.output_path)
        print(f"Wrote {args.output_path}", file=sys.stderr)
        side_by_side = (write_side_by_side(args.output_path, results["test_split"]["generated"]) if args.generate
                        else None)
        if side_by_side is not None:
            print(f"Wrote {side_by_side}: the answers of each model in {side_by_side.parent} side by side",
                  file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------------------
# A prepared test split


@torch.inference_mode()
def evaluate_test_split(model: LLaMA, tokenizer: Tokenizer, args: EvaluateArgs) -> dict:
    """The loss and perplexity over the response tokens of the whole test split (as training's evaluation computes
    them), and with --generate the share of greedy answers that match their references."""
    if (Path(args.data_dir) / "prepare_config.json").is_file() and \
            read_prepare_config(args.data_dir).get("kind") == "preference":
        return evaluate_pairs(model, tokenizer, args)
    _, test, config = load_prepared(args.data_dir, tokenizer)
    if not test:
        raise ValueError(f"{args.data_dir}/test.pt holds no examples: prepare the data with a test split "
                         "(--test_split_size)")
    max_seq_length = min(config["max_seq_length"], model.config.block_size)
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for start in range(0, len(test), args.batch_size):
        input_ids, labels = collate(test[start:start + args.batch_size], max_seq_length)
        total += float(loss_sum(model, input_ids.to(device), labels.to(device)))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss = total / count
    result = {"examples": len(test), "response_tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 50))}
    if args.generate:
        stop_ids = response_stop_ids(tokenizer, config.get("prompt_style", "alpaca"))
        result.update(score_answers(model, tokenizer, test, args, stop_ids))
    return result


def evaluate_pairs(model: LLaMA, tokenizer: Tokenizer, args: EvaluateArgs) -> dict:
    """Preference pairs (prepare_data/preference.py): how often the model finds the chosen answer likelier than the
    rejected one, and by how much (the mean of log p(chosen) - log p(rejected), in nats); with --generate, its greedy
    answers to the prompts against the chosen answers."""
    _, test, config = load_pairs(args.data_dir, tokenizer)
    if not test:
        raise ValueError(f"{args.data_dir}/test.pt holds no pairs: prepare them with a test split (--test_split_size)")
    max_seq_length = min(config["max_seq_length"], model.config.block_size)
    device = model.lm_head.weight.device
    margins = []
    for start in range(0, len(test), args.batch_size):
        batch = test[start:start + args.batch_size]
        chosen, rejected = (sequence_log_probs(model, *(t.to(device) for t in collate([p[k] for p in batch],
                                                                                        max_seq_length)))
                            for k in ("chosen", "rejected"))
        margins += (chosen - rejected).tolist()
    result = {"pairs": len(test), "preferred": sum(m > 0 for m in margins), "accuracy": sum(m > 0 for m in margins)
              / len(test), "margin": sum(margins) / len(test)}
    if args.generate:
        stop_ids = response_stop_ids(tokenizer, config.get("prompt_style", "alpaca"))
        result.update(score_answers(model, tokenizer, [p["chosen"] for p in test], args, stop_ids))
    return result


def last_answer(example: dict, stop_ids: tuple) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids) of a prepared example: its last response (the label tokens at its end),
    and everything before it; the end-of-answer token left out of the reference."""
    labelled = (example["labels"] != IGNORE_INDEX).tolist()
    end = max((i for i, is_label in enumerate(labelled) if is_label), default=-1) + 1
    start = end
    while start > 0 and labelled[start - 1]:
        start -= 1
    reference = [t for t in example["input_ids"][start:end].tolist() if t not in stop_ids]
    return example["input_ids"][:start].tolist(), reference


def score_answers(model: LLaMA, tokenizer: Tokenizer, test: list, args: EvaluateArgs, stop_ids: tuple) -> dict:
    """Greedy answers to the test split's prompts, compared with the references: the exact-match share."""
    pattern = re.compile(args.answer_pattern) if args.answer_pattern else None
    pairs = [last_answer(example, stop_ids) for example in test]
    references, reference_texts = [], []
    for number, (prompt, reference) in enumerate(pairs, 1):
        if not prompt:
            raise ValueError(f"{args.data_dir}/test.pt example {number} has no prompt before its answer (or no "
                             "answer): prepare the data again (see howto/prepare_dataset.md)")
        text = tokenizer.decode(reference)
        reference_texts.append(text)
        answer = normalise(text) if pattern is None else final_answer(pattern, text)
        if answer is None:
            raise ValueError(f"{args.data_dir}/test.pt example {number}: the reference answer {text[:80]!r} has no "
                             f"match for --answer_pattern {args.answer_pattern!r}: fix the pattern (or the data)")
        references.append(answer)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    answers: list = [None] * len(pairs)
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        # data prepared for a longer context than this model's: the prompt's oldest tokens cut, room for one answer
        prompts = [pairs[i][0][-(model.config.block_size - 1):] for i in batch]
        new_tokens = min(args.max_new_tokens, model.config.block_size - max(map(len, prompts)))
        texts = generate_texts(model, tokenizer, prompts, [], new_tokens, stop_ids=stop_ids)
        for i, text in zip(batch, texts):
            answer = normalise(text) if pattern is None else final_answer(pattern, text)
            answers[i] = {"answer": text, "correct": answer is not None and answer == references[i]}
    questions = prompt_contents([tokenizer.decode(prompt) for prompt, _ in pairs])
    for answer, question, reference in zip(answers, questions, reference_texts):
        answer.update(prompt=question, reference=reference)
    correct = sum(answer["correct"] for answer in answers)
    return {"answers": len(pairs), "exact_match": correct / len(pairs), "generated": answers}


def prompt_contents(prompts: list[str]) -> list[str]:
    """What differs between the prompts: each without the lines that all of them begin and end with (a template's
    fixed start and end: a system prompt, "### Response:", the assistant's header)."""
    lines = [prompt.strip().splitlines() for prompt in prompts]
    start = end = 0
    if len(lines) > 1:
        while all(len(l) > start and l[start] == lines[0][start] for l in lines):
            start += 1
        while all(len(l) > start + end and l[-1 - end] == lines[0][-1 - end] for l in lines):
            end += 1
    return ["\n".join(l[start:len(l) - end]).strip() for l in lines]


def write_side_by_side(output_path: Path, mine: list[dict]) -> Optional[Path]:
    """answers.md beside output_path: the generated answers (`mine`: this run's, written to output_path) of every
    results file in its folder that answered the same test split, a column each (named by its file), prompt by
    prompt. None if there is only one."""
    folder, runs = Path(output_path).parent, {}
    for path in sorted(folder.glob("*.json")):
        try:
            generated = read_json(path, "an evaluate script's --output_path").get("test_split", {}).get("generated")
        except (ValueError, AttributeError):  # not an evaluate script's results
            continue
        if isinstance(generated, list) and [isinstance(a, dict) and a.get("prompt") for a in generated] == [
                a["prompt"] for a in mine]:
            runs[path.stem] = generated
    if len(runs) < 2:
        return None

    def cell(text: str, limit: int = 200) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= limit else text[:limit - 3] + "..."

    lines = [f"# Answers side by side: {', '.join(runs)}", "",
             "Greedy answers to the test split's prompts; a check mark where it matches the reference.", "",
             "| # | prompt | reference | " + " | ".join(runs) + " |", "|---:|---|---|" + "---|" * len(runs)]
    for number, answer in enumerate(mine):
        cells = [str(number + 1), cell(answer["prompt"][-200:]), cell(answer["reference"])]
        cells += [cell(run[number]["answer"]) + (" ✓" if run[number]["correct"] else "") for run in runs.values()]
        lines.append("| " + " | ".join(cells) + " |")
    scores = ", ".join(f"{name} {sum(a['correct'] for a in run)}/{len(run)}" for name, run in runs.items())
    path = folder / "answers.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines + ["", f"Right: {scores}.", ""]),
                                                        encoding="utf-8"))
    return path


def normalise(text: str) -> str:
    """An answer as compared: lower case, runs of spaces as one, no surrounding spaces or final period."""
    return " ".join(text.lower().split()).rstrip(".")


def final_answer(pattern: re.Pattern, text: str):
    """The answer `pattern` finds in `text` (its first group, if it has one); a number if it reads as one
    ("1,000" and "1000.0" are 1000); None if it finds none."""
    match = pattern.search(text)
    if match is None:
        return None
    found = match.group(1) if pattern.groups else match.group(0)
    try:
        return float(found.replace(",", "").rstrip("."))
    except ValueError:
        return normalise(found)


# ---------------------------------------------------------------------------------------------------------
# A plain text


@torch.inference_mode()
def text_perplexity(model: LLaMA, tokenizer: Tokenizer, path: Path, batch_size: int) -> dict:
    """The perplexity of a text: each token predicted once, from as much of the text before it as the model's
    context holds (windows as the harness's loglikelihood_rolling makes them), the first from BOS."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): give a UTF-8 text file") from None
    check_utf8(text, str(path))
    tokens = tokenizer.encode(text, bos=False).tolist()
    if not tokens:
        raise ValueError(f"{path} is empty: give a text to measure the perplexity of")
    windows = rolling_windows(tokens, prefix_token_id(tokenizer), model.config.block_size)
    scores, _ = score_continuations(model, windows, batch_size)
    loss = -sum(score for score, _ in scores) / len(tokens)
    return {"tokens": len(tokens), "windows": len(windows), "loss": loss, "perplexity": math.exp(min(loss, 50))}
