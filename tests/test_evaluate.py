"""evaluate/*.py and lit_lora/evaluate*.py: lm-eval-harness tasks on lit-lora's own model give the figures of
lm-eval's Hugging Face model on the exported folder; the test split's loss is training's; bad input is one line."""

import json
import math
from pathlib import Path

import pytest
import torch

from lit_lora.checkpoint import load_model
from lit_lora.evaluate import encode_pair, rolling_windows
from lit_lora.lora import apply_lora
from lit_lora.method_files import save_lora
from lit_lora.model import Config, LLaMA
from lit_lora.tokenizer import Tokenizer
from tests.conftest import logged, lora_args, make_checkpoint, run_command
from tests.test_quantize import needs_bitsandbytes


NO_LM_EVAL = "lm-eval is an optional extra: pip install -e '.[eval]'"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The tasks' data are local files: never the network (HF_DATASETS_OFFLINE=1, also where datasets was imported
    before, having read the variable then)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets.config
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)

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


def evaluate_both(lit_model, hf_dir: Path, tokenizer: Tokenizer, tasks_dir: Path, tasks: list[str], **options):
    """simple_evaluate (with `options`) on lit-lora's model and on lm-eval's HF model over the exported folder,
    samples logged."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lit_lora.evaluate import harness_model

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # not the thousands of built-in tasks
    ours = evaluator.simple_evaluate(model=harness_model(lit_model.eval(), tokenizer, batch_size=5), tasks=tasks,
                                     task_manager=manager, log_samples=True, **options)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=5, device="cpu")
    reference = evaluator.simple_evaluate(model=hf, tasks=tasks, task_manager=manager, log_samples=True, **options)
    return ours, reference


@pytest.mark.parametrize("lora", [False, True], ids=["base, tokenizer.model", "lora unmerged, tokenizer.json"])
def test_harness_figures_equal_lm_eval_hf_model_on_the_export(tmp_path, tokenizer_path, smollm2_tokenizer_dir, lora,
                                                              capsys):
    """The same tasks on the same weights: lit-lora's model (LoRA unmerged) and `lm_eval --model hf` on the
    Hugging Face export (LoRA merged) give the same accuracies, answers and log-likelihoods (within 1e-4)."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
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
    ours, reference = evaluate_both(model, tmp_path / "hf", tokenizer, tasks_dir, tasks, limit=8)  # the long one first

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


SMOLLM2_GGUF = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF file .ci/run fetches (checkpoints/fetch_smollm2_gguf.py)."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"the real model is not here ({SMOLLM2_GGUF}): python checkpoints/fetch_smollm2_gguf.py fetches it")
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    from lit_lora.convert.gguf import convert_gguf_checkpoint

    return convert_gguf_checkpoint(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "lit")


@pytest.fixture(scope="module")
def real_model_hf_export(real_model, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported in fp32 to a Hugging Face folder (its chat template with it)."""
    pytest.importorskip("transformers", reason="the reference is lm-eval's Hugging Face model")
    from lit_lora.convert.hf import export_hf_checkpoint

    folder = tmp_path_factory.mktemp("smollm2-hf") / "hf"
    export_hf_checkpoint(real_model, folder, dtype="float32")
    return folder


def test_real_model_figures_equal_lm_eval_hf_model(real_model, real_model_hf_export, tmp_path, capsys):
    """SmolLM2-135M-Instruct, a capital question in its chat template (--apply_chat_template): the same
    accuracies, greedy answers and log-likelihoods (within 1e-4) as lm-eval's HF model on its export. (One: on a
    shared CPU core a forward pass of this model over a batch of questions takes seconds.)"""
    model = load_model(real_model, dtype=torch.float32)
    tasks_dir = write_tasks(tmp_path / "tasks")
    ours, reference = evaluate_both(model, real_model_hf_export, Tokenizer(real_model), tasks_dir,
                                    ["capitals_mc", "capitals_gen"], limit=1, apply_chat_template=True)
    for task, metric in [("capitals_mc", "acc,none"), ("capitals_mc", "acc_norm,none"),
                         ("capitals_gen", "exact_match,none")]:
        assert ours["results"][task][metric] == reference["results"][task][metric], (task, metric)
    ours_resps, reference_resps = responses(ours), responses(reference)
    difference = max_loglikelihood_difference(ours_resps["capitals_mc"], reference_resps["capitals_mc"])
    with capsys.disabled():  # the figures the report quotes
        print(f"SmolLM2-135M-Instruct: max |log-likelihood difference| {difference:.2e}, "
              f"answers {[r[0][0] for r in ours_resps['capitals_gen']]}")
    assert difference < 1e-4
    assert ours_resps["capitals_gen"] == reference_resps["capitals_gen"]


def test_context_and_continuation_tokens_split_as_the_harness_splits_them(tokenizer):
    """The context's trailing space moves onto the continuation; the pair encodes as the whole text does."""
    context, continuation = encode_pair(tokenizer, "Answer: ", "Paris")
    assert context == tokenizer.encode("Answer:").tolist()
    assert context + continuation == tokenizer.encode("Answer: Paris").tolist()
    empty_context, continuation = encode_pair(tokenizer, "", "Paris")
    assert empty_context == [tokenizer.bos_id] and continuation == tokenizer.encode("Paris", bos=False).tolist()


@pytest.mark.parametrize("method", ["base", "lora", "adapter"])
def test_a_shared_context_read_once_scores_as_each_pair_read_whole(method, monkeypatch):
    """Multiple-choice pairs share their context: read once into the KV cache, then each continuation after it,
    the scores equal those of each pair read whole (score_rows), for every method's layers; groups larger than a
    batch, one-token continuations, and a group too long to share its context (scored whole) included."""
    from lit_lora.adapter import apply_adapter
    from lit_lora.evaluate import score_continuations, score_rows

    torch.manual_seed(0)
    model = LLaMA(Config(block_size=32, vocab_size=64, n_layer=3, n_head=4, n_embd=32, n_query_groups=2))
    if method == "lora":
        apply_lora(model, r=4, dropout=0.0)
    elif method == "adapter":
        apply_adapter(model, prompt_length=3, start_layer=1)
    for name, parameter in model.named_parameters():  # LoRA's B and the adapter's gates start at 0: not here
        if "lora_B" in name or "gating_factor" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    model.eval()
    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 64, (n,), generator=generator).tolist()

    pairs = []
    groups = [(7, [1, 3, 6, 2]), (12, [3, 1]), (9, [1, 3, 6, 2, 4, 1, 5]),  # shared
              (1, [1, 1, 4]),  # a context shorter than its continuations: scored whole
              (28, [2, 6])]  # 28 + 6 > 32: scored whole, and truncated from the left
    for context_length, lengths in groups:
        context = ids(context_length)
        pairs += [(context, ids(n)) for n in lengths]
    pairs.insert(3, (ids(6), ids(2)))  # a context of its own
    import lit_lora.evaluate

    read_once = []  # the groups score_continuations reads through the KV cache
    spy = lit_lora.evaluate.score_shared_contexts
    monkeypatch.setattr(lit_lora.evaluate, "score_shared_contexts",
                        lambda model, pairs, groups, batch_size: read_once.extend(groups) or spy(model, pairs,
                                                                                                 groups, batch_size))
    shared, truncated = score_continuations(model, pairs, batch_size=5)
    whole = score_rows(model, pairs, batch_size=5)
    assert truncated == 1 and sorted(map(len, read_once)) == [2, 4, 7]
    for (ours, ours_greedy), (reference, reference_greedy) in zip(shared, whole, strict=True):
        assert ours == pytest.approx(reference, abs=1e-5) and ours_greedy == reference_greedy
    assert len({round(score, 3) for score, _ in whole}) > len(pairs) - 2  # the scores differ from pair to pair


@needs_bitsandbytes
def test_a_4bit_base_with_lora_scores_through_the_shared_context_path(setup, tokenizer):
    """evaluate/lora.py --quantize: the Blocks' linears in NF4 (bitsandbytes), LoRA unmerged on top; the shared
    contexts read through the KV cache score as each pair read whole, and near the 16/32-bit model's scores."""
    from lit_lora.evaluate import score_continuations, score_rows
    from lit_lora.quantize import load_model_4bit

    checkpoint_dir, _, _ = setup
    models = [apply_lora(load(checkpoint_dir), r=4, dropout=0.0) for load in (load_model,
                                                                            lambda c: load_model_4bit(c, "bnb.nf4"))]
    torch.manual_seed(0)
    b = {name: torch.randn_like(p) * 0.3 for name, p in models[0].named_parameters() if "lora_B" in name}
    for model in models:
        model.load_state_dict(b, strict=False)
        model.eval()
    context = tokenizer.encode("Question: What is the capital of France?\nAnswer:").tolist()
    pairs = [(context, tokenizer.encode(f" {city}", bos=False).tolist()) for city in ("Paris", "Rome", "Oslo")]
    plain, _ = score_continuations(models[0], pairs, batch_size=4)
    shared, _ = score_continuations(models[1], pairs, batch_size=4)
    whole = score_rows(models[1], pairs, batch_size=4)
    assert [score for score, _ in shared] == pytest.approx([score for score, _ in whole], abs=1e-4)
    assert [score for score, _ in shared] == pytest.approx([score for score, _ in plain], rel=0.1)  # NF4's error
    assert [score for score, _ in shared] != pytest.approx([score for score, _ in plain], abs=1e-6)  # it is 4-bit


@pytest.mark.parametrize("length", [1, 7, 8, 9, 20, 33])
def test_rolling_windows_are_the_harness_windows(length):
    lm_eval_utils = pytest.importorskip("lm_eval.utils", reason=NO_LM_EVAL)
    tokens = list(range(100, 100 + length))
    expected = [lm_eval_utils.make_disjoint_window(w)
                for w in lm_eval_utils.get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=8, context_len=1)]
    assert rolling_windows(tokens, 1, 8) == expected


def test_test_split_loss_equals_trainings_evaluation_loss(setup):
    """evaluate/lora.py --data_dir: the loss over the whole test split is the validation loss training logged."""
    from finetune.lora import main as finetune

    checkpoint_dir, data_dir, tmp_path = setup
    finetune(lora_args(checkpoint_dir, data_dir, tmp_path / "out", max_steps=2, eval_interval=0, save_interval=0))
    val_loss = logged(tmp_path / "out", "val_loss")[-1]
    code, out, err = run_command("evaluate/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                                 "--lora_path", tmp_path / "out" / "lit_lora_finetuned.pth", "--precision", "32-true",
                                 "--output_path", tmp_path / "eval.json", "--batch_size", 3)
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())["test_split"]
    assert result["examples"] == 4
    assert result["loss"] == pytest.approx(val_loss, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-4)


def test_text_perplexity_is_the_cross_entropy_of_the_text(tmp_path, tokenizer_path, tokenizer):
    """--text_file: each token predicted once from BOS and the text before it; a text that fits the context is one
    forward pass, a longer one is read in windows."""
    from lit_lora.evaluate_data import text_perplexity

    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path, block_size=64)
    model = load_model(checkpoint, dtype=torch.float32).eval()
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog: 12 + 34 = 46.")
    ids = tokenizer.encode(short.read_text(), bos=True)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()
    result = text_perplexity(model, tokenizer, short, batch_size=2)
    assert result["windows"] == 1 and result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    long = tmp_path / "long.txt"
    long.write_text(short.read_text() * 8)
    assert text_perplexity(model, tokenizer, long, batch_size=2)["windows"] > 1


def test_answers_compare_after_normalising_and_numbers_as_numbers():
    import re

    from lit_lora.evaluate_data import final_answer, normalise

    assert normalise("  The  Cat sat.") == normalise("the cat sat")
    gsm8k = re.compile(r"#### (\-?[0-9.,]+)")
    assert final_answer(gsm8k, "so 1000 in all.\n#### 1,000") == final_answer(gsm8k, "#### 1000.0") == 1000.0
    assert final_answer(gsm8k, "I do not know") is None


def test_script_runs_a_local_task_counts_truncated_contexts_and_writes_lm_evals_layout(tmp_path, tokenizer_path,
                                                                                      monkeypatch):
    """evaluate/base.py --include_path --tasks: lm-eval's results JSON, written whole; a context longer than the
    model's is truncated from the left, and the script says how many were."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    skip_builtin_tasks(monkeypatch)
    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path, block_size=64)
    tasks_dir = write_tasks(tmp_path / "tasks", long_question=True)
    output = tmp_path / "results" / "base.json"
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris.")
    code, out, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint, "--include_path", tasks_dir,
                                 "--tasks", "capitals_mc", "--limit", 5, "--output_path", output, "--precision",
                                 "32-true", "--text_file", text)
    assert code == 0, err
    assert "4 context(s) longer than the model's 64 tokens were truncated from the left" in err  # 4 choices, 1 doc
    results = json.loads(output.read_text())
    assert 0 <= results["results"]["capitals_mc"]["acc,none"] <= 1 and results["truncated_contexts"] == 4
    assert results["n-samples"]["capitals_mc"]["effective"] == 5
    assert "capitals_mc" in out  # lm-eval's table
    assert results["text_file"]["tokens"] > 0  # and this run's own figures beside lm-eval's


def skip_builtin_tasks(monkeypatch):
    """The harness's own thousands of task YAMLs take seconds to index: these tests need only theirs."""
    import functools

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_task_is_one_line_saying_how_to_list_tasks(tmp_path, tokenizer_path, monkeypatch):
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    skip_builtin_tasks(monkeypatch)
    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path)
    output = tmp_path / "out.json"
    code, _, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint, "--tasks", "capitals_mcq",
                               "--include_path", write_tasks(tmp_path / "tasks"), "--output_path", output)
    assert code == 1
    assert "unknown task(s): capitals_mcq" in one_error_line(err) and "lm-eval ls tasks" in err
    assert not output.exists() and not list(tmp_path.glob(".out.json*"))


def test_task_whose_data_needs_a_download_is_one_line_naming_it(tmp_path, tokenizer_path, monkeypatch):
    """No network (no_network, above): a task reading a dataset of the Hugging Face Hub."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    skip_builtin_tasks(monkeypatch)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: lit-lora-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    output = tmp_path / "out.json"
    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path)
    code, _, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint, "--include_path", tasks_dir,
                               "--tasks", "hub_task", "--output_path", output)
    line = one_error_line(err)
    assert code == 1 and "could not be downloaded" in line and "lit-lora-tests/no-such-dataset" in line
    assert "hub_task" in line and not output.exists()


def test_chat_template_asked_of_a_checkpoint_without_one_is_one_line(tmp_path, tokenizer_path, monkeypatch):
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    skip_builtin_tasks(monkeypatch)
    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path)
    code, _, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint, "--tasks", "capitals_mc",
                               "--include_path", write_tasks(tmp_path / "tasks"), "--apply_chat_template", "true")
    assert code == 1 and "--apply_chat_template" in one_error_line(err) and "has no chat template" in err


def test_limit_0_is_refused_while_parsing(tmp_path, tokenizer_path):
    checkpoint = make_checkpoint(tmp_path / "lit", tokenizer_path)
    code, _, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint, "--tasks", "arc_easy",
                               "--limit", 0, "--output_path", tmp_path / "out.json")
    assert code == 2 and "--limit 0.0: must be above 0" in one_error_line(err)
    assert not (tmp_path / "out.json").exists()


def test_lora_file_of_another_base_model_is_one_line(setup, tokenizer_path):
    checkpoint_dir, data_dir, tmp_path = setup
    other = make_checkpoint(tmp_path / "other", tokenizer_path, block_size=256, n_embd=64)  # another shape
    model = load_model(other)
    apply_lora(model, r=4, targets=("q", "v"))
    save_lora(model, tmp_path / "other_lora.pth")
    code, _, err = run_command("evaluate/lora.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                               "--lora_path", tmp_path / "other_lora.pth", "--output_path", tmp_path / "out.json")
    line = one_error_line(err)
    assert code == 1 and "other_lora.pth was trained on another base model" in line and "n_embd" in line
    assert not (tmp_path / "out.json").exists()


def test_reference_without_a_numeric_answer_under_answer_pattern_is_one_line(setup):
    """The references of the test split are words: GSM8K's pattern finds no number in them, named with the
    example, before any answer is generated; nothing is written."""
    checkpoint_dir, data_dir, tmp_path = setup
    code, _, err = run_command("evaluate/base.py", "--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir,
                               "--generate", "true", "--answer_pattern", r"#### (\-?[0-9.,]+)",
                               "--output_path", tmp_path / "out.json")
    line = one_error_line(err)
    assert code == 1 and "test.pt example 1" in line and "--answer_pattern" in line
    assert not (tmp_path / "out.json").exists()


def test_generated_answers_are_scored_and_written_side_by_side(setup):
    """--generate: each test example's greedy answer is kept with its prompt (what the template surrounds) and
    reference; two models' results in one folder give answers.md, a column each, check marks where right."""
    checkpoint_dir, data_dir, tmp_path = setup
    model = apply_lora(load_model(checkpoint_dir), r=4, targets=("q", "v"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a LoRA that changes the answers
            torch.nn.init.normal_(parameter, std=0.5)
    save_lora(model, tmp_path / "lora.pth")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.json").write_text('{"test_split": 3}')  # not a results file: left alone
    for name, flags in [("base", []), ("lora", ["--lora_path", tmp_path / "lora.pth"])]:
        code, _, err = run_command(f"evaluate/{name}.py", "--checkpoint_dir", checkpoint_dir, "--data_dir",
                                   data_dir, "--generate", "true", "--max_new_tokens", 4, "--output_path",
                                   tmp_path / "results" / f"{name}.json", *flags)
        assert code == 0, err
    results = {name: json.loads((tmp_path / "results" / f"{name}.json").read_text())["test_split"]
               for name in ["base", "lora"]}
    base, lora = results["base"], results["lora"]
    assert base["answers"] == 4 and 0 <= base["exact_match"] <= 1 and math.isfinite(base["loss"])
    test = torch.load(data_dir / "test.pt", weights_only=True)
    tokenizer = Tokenizer(checkpoint_dir)
    for example, answer in zip(test, base["generated"], strict=True):
        prompt = tokenizer.decode(example["input_ids"][example["labels"] == -100])
        assert answer["prompt"] in prompt and not answer["prompt"].endswith("### Response:")  # the template's end
        assert answer["prompt"].endswith("Say the word.") or "Repeat the word twice." in answer["prompt"]
        assert answer["reference"] in prompt + tokenizer.decode(example["input_ids"])  # the example's own output
        assert tokenizer.decode(example["input_ids"]).rstrip().endswith(answer["reference"])
    assert [a["answer"] for a in base["generated"]] != [a["answer"] for a in lora["generated"]]
    table = (tmp_path / "results" / "answers.md").read_text().splitlines()
    assert "| # | prompt | reference | base | lora |" in table
    rows = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    for row, b, l in zip(rows, base["generated"], lora["generated"]):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[2] == " ".join(b["reference"].split())
        assert cells[3].endswith("✓") == b["correct"] and cells[4].endswith("✓") == l["correct"]
    right = [sum(a["correct"] for a in r["generated"]) for r in (base, lora)]
    assert f"Right: base {right[0]}/4, lora {right[1]}/4." in table
    assert right[0] == base["exact_match"] * 4 and right[1] == lora["exact_match"] * 4


@pytest.mark.parametrize("script", ["base", "lora", "adapter", "full"])
def test_every_evaluate_script_loads_its_model_and_evaluates_a_text(setup, script):
    """evaluate/{base,lora,adapter,full}.py --text_file: each loads its method as generate/* does, and the LoRA and
    adapter files (gates and B at zero: no change yet) give the base model's perplexity."""
    from lit_lora.adapter import apply_adapter
    from lit_lora.method_files import save_adapter

    checkpoint_dir, _, tmp_path = setup
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog: 12 + 34 = 46. " * 3)
    flags = {"lora": ["--lora_path", tmp_path / "lora.pth"], "adapter": ["--adapter_path", tmp_path / "adapter.pth"]}
    save_lora(apply_lora(load_model(checkpoint_dir), r=4, targets=("q", "v")), tmp_path / "lora.pth")
    save_adapter(apply_adapter(load_model(checkpoint_dir), prompt_length=4, start_layer=0), tmp_path / "adapter.pth")
    results = []
    for name in ["base", script]:
        code, _, err = run_command(f"evaluate/{name}.py", "--checkpoint_dir", checkpoint_dir, "--text_file", text,
                                   "--precision", "32-true", "--output_path", tmp_path / f"{name}.json",
                                   *flags.get(name, []))
        assert code == 0, err
        results.append(json.loads((tmp_path / f"{name}.json").read_text())["text_file"])
    assert results[1]["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-5)
