"""evaluate/*.py and lit_lora/evaluate*.py: lm-eval-harness tasks on lit-lora's own model give the figures of
lm-eval's Hugging Face model on the exported folder; the test split's loss is training's; bad input is one line."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lit_lora.checkpoint import load_model
from lit_lora.evaluate import encode_pair, rolling_windows
from lit_lora.method_files import save_lora
from lit_lora.lora import apply_lora
from lit_lora.tokenizer import Tokenizer
from tests.conftest import make_checkpoint

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' data are local files: never the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Cuba", "Havana"),
             ("Chile", "Santiago"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Canada", "Ottawa"),
             ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"),
             ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
             ("Nepal", "Kathmandu"), ("Mali", "Bamako")]


def write_tasks(folder: Path, long_question: bool = False) -> Path:
    """A local multiple-choice task (the capital of each country), the same questions as a generation task, and
    their sentences as a perplexity task: YAML files and the JSON lines they read, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    capitals = [capital for _, capital in COUNTRIES]
    with open(folder / "capitals.jsonl", "w") as f:
        for i, (country, capital) in enumerate(COUNTRIES):
            choices = [capital] + [capitals[(i + k) % len(capitals)] for k in (3, 7, 11)]
            question = f"What is the capital of {country}?"
            if long_question and i == 0:  # longer than the tiny model's context: truncated from the left
                question = "Think hard. " * 40 + question
            # a sentence for perplexity; the first one longer than the tiny model's context: two windows
            text = " ".join([f"The capital of {country} is {capital}."] * (6 if i == 0 else 1))
            f.write(json.dumps({"question": question, "choices": choices, "answer": 0, "text": text}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'capitals.jsonl'}\n"
              f"  cache_dir: {folder / 'cache'}\ntest_split: test\n")
    (folder / "capitals_mc.yaml").write_text(
        "task: capitals_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer: \"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "capitals_gen.yaml").write_text(
        "task: capitals_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{choices[answer]}}\"\n"
        "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "capitals_ppl.yaml").write_text(
        "task: capitals_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return folder


def responses(results: dict) -> dict:
    """Each task's per-document model responses, in document order, from simple_evaluate(log_samples=True)."""
    return {task: [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def loglikelihood(response) -> float:
    """The log-likelihood in a logged response: [(loglikelihood, is_greedy)] or [loglikelihood] (rolling)."""
    while isinstance(response, (list, tuple)):
        response = response[0]
    return response


def max_loglikelihood_difference(ours: list, reference: list) -> float:
    return max(abs(loglikelihood(a) - loglikelihood(b)) for doc_a, doc_b in zip(ours, reference)
               for a, b in zip(doc_a, doc_b, strict=True))


def evaluate_both(lit_model, hf_dir: Path, tokenizer: Tokenizer, tasks_dir: Path, tasks: list[str]):
    """simple_evaluate on lit-lora's model and on lm-eval's HF model over the exported folder, samples logged."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lit_lora.evaluate import harness_model

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # not the thousands of built-in tasks
    ours = evaluator.simple_evaluate(model=harness_model(lit_model.eval(), tokenizer, batch_size=5), tasks=tasks,
                                     task_manager=manager, log_samples=True)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=5, device="cpu")
    reference = evaluator.simple_evaluate(model=hf, tasks=tasks, task_manager=manager, log_samples=True)
    return ours, reference


@pytest.mark.parametrize("lora", [False, True], ids=["base, tokenizer.model", "lora unmerged, tokenizer.json"])
def test_harness_figures_equal_lm_eval_hf_model_on_the_export(tmp_path, tokenizer_path, smollm2_tokenizer_dir, lora,
                                                              capsys):
    """The same tasks on the same weights: lit-lora's model (LoRA unmerged) and `lm_eval --model hf` on the
    Hugging Face export (LoRA merged) give the same accuracies, answers and log-likelihoods (within 1e-4)."""
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[eval]'")
    pytest.importorskip("transformers", reason="the reference is lm-eval's Hugging Face model")
    from lit_lora.convert.hf import export_hf_checkpoint

    # no padded vocabulary rows: lit-lora picks only ids the tokenizer has, Hugging Face's generate any of the rows
    checkpoint = make_checkpoint(tmp_path / "lit", smollm2_tokenizer_dir if lora else tokenizer_path, block_size=64,
                                 padding_multiple=1)
    model = load_model(checkpoint, dtype=torch.float32)
    lora_path = None
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=0.0, targets=("q", "v", "head"))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        lora_path = tmp_path / "lora.pth"
        save_lora(model, lora_path)
    export_hf_checkpoint(checkpoint, tmp_path / "hf", lora_path)
    tasks_dir = write_tasks(tmp_path / "tasks", long_question=True)
    tokenizer = Tokenizer(checkpoint)
    tasks = ["capitals_mc", "capitals_gen", "capitals_ppl"]
    ours, reference = evaluate_both(model, tmp_path / "hf", tokenizer, tasks_dir, tasks)

    for task, metric in [("capitals_mc", "acc,none"), ("capitals_mc", "acc_norm,none"),
                         ("capitals_gen", "exact_match,none")]:
        assert ours["results"][task][metric] == reference["results"][task][metric], (task, metric)
    for metric in ["word_perplexity,none", "bits_per_byte,none"]:
        assert ours["results"]["capitals_ppl"][metric] == pytest.approx(reference["results"]["capitals_ppl"][metric],
                                                                         rel=1e-5)
    ours_resps, reference_resps = responses(ours), responses(reference)
    differences = {t: max_loglikelihood_difference(ours_resps[t], reference_resps[t])
                   for t in ["capitals_mc", "capitals_ppl"]}
    with capsys.disabled():  # the figures the report quotes
        print(f"max |log-likelihood difference| ({'LoRA unmerged' if lora else 'base'}): {differences}")
    assert max(differences.values()) < 1e-4
    # The same greedy answers, cut alike. A random model writes bytes that are not UTF-8, which SentencePiece decodes
    # byte by byte and Hugging Face's tokenizer.json as one U+FFFD per byte of the run: compared with tokenizer.json.
    if lora:  # tokenizer.json on both sides
        assert ours_resps["capitals_gen"] == reference_resps["capitals_gen"]


def test_context_and_continuation_tokens_split_as_the_harness_splits_them(tokenizer):
    """The context's trailing space moves onto the continuation; the pair encodes as the whole text does."""
    context, continuation = encode_pair(tokenizer, "Answer: ", "Paris")
    assert context == tokenizer.encode("Answer:").tolist()
    assert context + continuation == tokenizer.encode("Answer: Paris").tolist()
    empty_context, continuation = encode_pair(tokenizer, "", "Paris")
    assert empty_context == [tokenizer.bos_id] and continuation == tokenizer.encode("Paris", bos=False).tolist()


@pytest.mark.parametrize("length", [1, 7, 8, 9, 20, 33])
def test_rolling_windows_are_the_harness_windows(length):
    lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval is an optional extra: pip install -e .[eval]")
    tokens = list(range(100, 100 + length))
    expected = [lm_eval_utils.make_disjoint_window(w)
                for w in lm_eval_utils.get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=8, context_len=1)]
    assert rolling_windows(tokens, 1, 8) == expected
