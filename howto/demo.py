"""The whole course on a CPU in a few minutes: pretrain a tiny LLaMA, teach it a new task with LoRA, compare.

    python howto/demo.py

Nothing is downloaded. Every stage runs the project's real code, the same as a 7B run:
1. data      generate letter puzzles (answers checkable exactly), train a small SentencePiece tokenizer,
             prepare them with prepare_data/json_data.py;
2. pretrain  finetune/full.py --from_scratch: a `tiny` LLaMA learns the base tasks (repeat, reverse);
3. LoRA      finetune/lora.py teaches the frozen base a new task (rotate the letters left by one);
4. generate  generate/lora.py answers a few held-out puzzles;
5. compare   exact-match accuracy of the base model and of the LoRA model on held-out puzzles of the new
             task, the trainable share, the LoRA file size, and the time of each stage.
"""

import json
import random
import sys
import time
from pathlib import Path
from typing import Literal, Union

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts in finetune/, generate/ and prepare_data/ are imported as modules

from finetune.full import FullArgs  # noqa: E402
from finetune.full import main as full_finetune
from finetune.lora import LoRAArgs  # noqa: E402
from finetune.lora import main as lora_finetune
from generate.lora import LoRAGenerateArgs  # noqa: E402
from generate.lora import main as lora_generate
from lit_lora.checkpoint import load_model  # noqa: E402
from lit_lora.cli import cli  # noqa: E402
from lit_lora.data import IGNORE_INDEX, collate, tokenize_example  # noqa: E402
from lit_lora.generation import generate  # noqa: E402
from lit_lora.lora import merge_lora  # noqa: E402
from lit_lora.method_files import load_lora  # noqa: E402
from lit_lora.prompts import format_prompt  # noqa: E402
from lit_lora.report import format_bytes  # noqa: E402
from lit_lora.resume import refuse_to_start_over  # noqa: E402
from lit_lora.tokenizer import Tokenizer  # noqa: E402
from lit_lora.train import loss_sum  # noqa: E402
from prepare_data.json_data import JSONArgs  # noqa: E402
from prepare_data.json_data import main as prepare_json

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Each task: an instruction and what it does to a list of letters. The base model learns the first two;
# LoRA then teaches the third, which the base model has never seen.
TASKS = {
    "repeat": ("Repeat the letters.", lambda xs: xs),
    "reverse": ("Reverse the letters.", lambda xs: xs[::-1]),
    "rotate": ("Rotate the letters left by one.", lambda xs: xs[1:] + xs[:1]),
}
BASE_TASKS, NEW_TASK = ("repeat", "reverse"), "rotate"


def make_record(task: str, rng: random.Random, length: int = 4) -> dict:
    instruction, solve = TASKS[task]
    letters = [rng.choice(LETTERS) for _ in range(length)]
    return {"instruction": instruction, "input": " ".join(letters), "output": " ".join(solve(letters))}


def stage(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)), flush=True)
    return time.perf_counter()


@torch.no_grad()
def response_loss(model, tokenizer: Tokenizer, records: list[dict]) -> float:
    """Mean cross-entropy per response token: the training loss, measured on held-out puzzles."""
    examples = [tokenize_example(r, tokenizer, model.config.block_size) for r in records]
    input_ids, labels = collate(examples, model.config.block_size)
    return (loss_sum(model, input_ids, labels) / (labels[:, 1:] != IGNORE_INDEX).sum()).item()


def accuracy(model, tokenizer: Tokenizer, records: list[dict]) -> tuple[float, list[str]]:
    """Exact match of greedy answers, all records decoded as one batch by the project's sampler."""
    prompts = [tokenizer.encode(format_prompt(r["instruction"], r["input"]), bos=True) for r in records]
    answers = [tokenizer.decode(a) for a in generate(model, prompts, max_new_tokens=16, temperature=0.0,
                                                      stop_ids=tokenizer.stop_ids, vocab_size=tokenizer.vocab_size)]
    return sum(a.strip() == r["output"] for a, r in zip(answers, records)) / len(records), answers


def main(out_dir: Path = Path("out/demo"), seed: int = 42, pretrain_steps: int = 2000, pretrain_learning_rate: float = 1e-3,
         lora_steps: int = 300, lora_learning_rate: float = 1e-2, lora_r: int = 8, train_examples: int = 4000,
         eval_examples: int = 100, resume: Union[bool, Literal["auto"]] = False, overwrite: bool = False) -> dict:
    """Run the CPU demo end to end and print the before/after table.

    Args:
        out_dir: Where data, the tiny base model and the LoRA file go.
        seed: Seeds the puzzles, the initialisation, the data order and dropout: the run is deterministic.
        pretrain_steps: Optimizer steps of pretraining the tiny base model on the base tasks.
        pretrain_learning_rate: Peak learning rate of pretraining.
        lora_steps: Optimizer steps of LoRA finetuning on the new task.
        lora_learning_rate: Peak learning rate of LoRA finetuning.
        lora_r: LoRA rank (on q and v, alpha = 2 r).
        train_examples: Puzzles per stage's training set.
        eval_examples: Held-out puzzles for each accuracy figure.
        resume: auto: continue an interrupted demo (Ctrl-C saves the training stage's state): each training stage
            resumes from its state in out_dir, or starts if it has none; the data are made again, the same.
        overwrite: Run the demo again from the start in an out_dir that holds an earlier demo's saved states.
    """
    torch.manual_seed(seed)
    times, rng = {}, random.Random(seed)
    out_dir = Path(out_dir)
    for stage_dir in (out_dir / "base", out_dir / "lora"):  # before any work: a rerun never replaces them unasked
        refuse_to_start_over(stage_dir, resume, overwrite)

    start = stage("1. Data: letter puzzles, a tokenizer, prepare_data/json_data.py")
    base_records = [make_record(rng.choice(BASE_TASKS), rng) for _ in range(train_examples)]
    new_records = [make_record(NEW_TASK, rng) for _ in range(train_examples)]
    seen = {r["input"] for r in base_records + new_records}
    held_out = []  # puzzles whose letters appear in no training example
    while len(held_out) < eval_examples:
        record = make_record(NEW_TASK, rng)
        if record["input"] not in seen:
            held_out.append(record)
            seen.add(record["input"])
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("base", base_records), ("new", new_records)):
        (data_dir / f"{name}.json").write_text(json.dumps(records))
    texts = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in base_records + new_records]
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer = Tokenizer.train(texts, vocab_size=512, model_prefix=tokenizer_dir / "tokenizer")
    print(f"Trained a SentencePiece tokenizer with {tokenizer.vocab_size} tokens: {tokenizer_dir / 'tokenizer.model'}")
    for name in ("base", "new"):
        prepare_json(JSONArgs(data_file=data_dir / f"{name}.json", checkpoint_dir=tokenizer_dir,
                              destination_path=data_dir / name, max_seq_length=128, test_split_size=100, seed=seed))
    times["data"] = time.perf_counter() - start

    start = stage("2. Pretrain a tiny LLaMA from scratch on the base tasks: finetune/full.py --from_scratch")
    base_dir = out_dir / "base"
    pretrain = full_finetune(FullArgs(
        checkpoint_dir=tokenizer_dir, data_dir=data_dir / "base", out_dir=base_dir, from_scratch=True,
        model_name="tiny", precision="32-true", seed=seed, learning_rate=pretrain_learning_rate, global_batch_size=32,
        micro_batch_size=32, max_steps=pretrain_steps, warmup_steps=30, eval_interval=0, save_interval=0,
        log_interval=max(1, pretrain_steps // 10), eval_instruction=TASKS["reverse"][0], eval_input="a b c d",
        eval_max_new_tokens=10, resume=resume, overwrite=overwrite,
    ))
    times["pretrain"] = time.perf_counter() - start

    start = stage("3. Teach the frozen base a new task with LoRA: finetune/lora.py")
    lora_dir = out_dir / "lora"
    lora = lora_finetune(LoRAArgs(
        checkpoint_dir=base_dir, data_dir=data_dir / "new", out_dir=lora_dir, precision="32-true", seed=seed,
        learning_rate=lora_learning_rate, global_batch_size=32, micro_batch_size=32, max_steps=lora_steps, warmup_steps=10,
        eval_interval=0, save_interval=0, log_interval=max(1, lora_steps // 10), lora_r=lora_r,
        lora_alpha=2 * lora_r, lora_dropout=0.0, eval_instruction=TASKS[NEW_TASK][0], eval_input="a b c d",
        eval_max_new_tokens=10, resume=resume, overwrite=overwrite,
    ))
    times["lora"] = time.perf_counter() - start
    lora_path = lora_dir / "lit_lora_finetuned.pth"

    start = stage("4. Generate with the LoRA model: generate/lora.py")
    for record in held_out[:3]:
        print(f">> {record['instruction']} {record['input']}   (expected: {record['output']})")
        lora_generate(LoRAGenerateArgs(checkpoint_dir=base_dir, lora_path=lora_path, prompt=record["instruction"],
                                       input=record["input"], max_new_tokens=16, temperature=0.0))
    times["generate"] = time.perf_counter() - start

    start = stage(f"5. Compare on {eval_examples} held-out puzzles")
    base_model = load_model(base_dir).eval()
    base_new, _ = accuracy(base_model, tokenizer, held_out)
    base_new_loss = response_loss(base_model, tokenizer, held_out)
    base_old, _ = accuracy(base_model, tokenizer, [make_record(rng.choice(BASE_TASKS), rng) for _ in range(eval_examples)])
    lora_model = load_lora(load_model(base_dir), lora_path).eval()
    merge_lora(lora_model)
    lora_new, lora_answers = accuracy(lora_model, tokenizer, held_out)
    lora_new_loss = response_loss(lora_model, tokenizer, held_out)
    times["compare"] = time.perf_counter() - start

    share = 100 * lora["trainable_parameters"] / lora["total_parameters"]
    rows = [
        ("base model (pretrained)", f"{100 * base_new:.0f}%", f"{base_new_loss:.3f}", f"{100 * base_old:.0f}%",
         f"{pretrain['trainable_parameters']:,} (100%)", format_bytes((base_dir / "lit_model.pth").stat().st_size)),
        ("base + LoRA", f"{100 * lora_new:.0f}%", f"{lora_new_loss:.3f}", "",
         f"{lora['trainable_parameters']:,} ({share:.1f}%)", format_bytes(lora_path.stat().st_size)),
    ]
    header = ("model", f"{NEW_TASK}: accuracy", f"{NEW_TASK}: loss", "base tasks: accuracy", "trained parameters", "file")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    print("\n" + " | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("\nTime: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items())
          + f"; total {sum(times.values()):.0f} s")
    return {"base_new_task_accuracy": base_new, "base_old_tasks_accuracy": base_old, "lora_new_task_accuracy": lora_new,
            "base_new_task_loss": base_new_loss, "lora_new_task_loss": lora_new_loss,
            "lora_answers": lora_answers, "held_out": held_out, "times": times, "lora": lora, "pretrain": pretrain}


if __name__ == "__main__":
    cli(main)
