"""DPO with LoRA (lit_lora/dpo.py, finetune/dpo.py) and preference data (lit_lora/preference.py).

Fidelity is checked against the paper's definition, computed here the plain way: each sequence run alone through
the model, log_softmax over every position, the answer tokens' log-probabilities summed, the reference a copy of the
model without LoRA, and the loss -log sigmoid(beta * margin) in Python's math. (TRL's DPOTrainer is not called: its
loss is written inside the trainer's step, on its own batches; the definition is what both implement.)
"""

import copy
import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import WORDS, hidden_leftovers, interrupt_at, logged, make_checkpoint
from lit_lora.data import IGNORE_INDEX, collate, pack, prepare
from lit_lora.dpo import combined_lora, dpo_loss, dpo_objective, sequence_log_probs
from lit_lora.checkpoint import load_model
from lit_lora.lora import (
    LoRAConfig,
    apply_lora,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    merge_lora,
    target_linears,
)
from lit_lora.method_files import load_lora, read_lora_file, save_lora
from lit_lora.model import Config, LLaMA
from lit_lora.prompts import single_token_id
from lit_lora.preference import load_pairs, load_preference_records, preference_record, tokenize_pair

# ---------------------------------------------------------------------------------------------------------
# The loss, the log-probabilities, the reference


def paper_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, smoothing):
    """One pair's loss from the definition (conservative DPO's for smoothing > 0), in Python floats."""
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    return -(1 - smoothing) * log_sigmoid(margin) - smoothing * log_sigmoid(-margin)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_and_rewards_are_the_papers(smoothing):
    torch.manual_seed(0)
    logps = [torch.randn(6, dtype=torch.float64) * 5 for _ in range(4)]
    losses, chosen, rejected = dpo_loss(*logps, beta=0.3, label_smoothing=smoothing)
    for i in range(6):
        values = [float(t[i]) for t in logps]
        assert float(losses[i]) == pytest.approx(paper_loss(*values, 0.3, smoothing), abs=1e-12)
        assert float(chosen[i]) == pytest.approx(0.3 * (values[0] - values[2]), abs=1e-12)
        assert float(rejected[i]) == pytest.approx(0.3 * (values[1] - values[3]), abs=1e-12)
    same = torch.zeros(3)
    assert torch.allclose(dpo_loss(same, same, same, same)[0], torch.full((3,), math.log(2)))  # pi = ref: log 2


def tiny_model(seed: int = 0, lora: bool = True) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(Config.from_name("micro", vocab_size=64, block_size=64))
    if lora:
        apply_lora(model, r=2, alpha=4, dropout=0.0, targets=("q", "v", "o"))
        for module in lora_modules(model):  # B = 0 would make LoRA the identity: give it an update to switch off
            torch.nn.init.normal_(module.lora_B, std=0.2)
    return model.float()


def sequences_with_answers(seed: int = 0, n: int = 4) -> list[dict]:
    """n sequences of 5 to 14 tokens; the last 2 to 4 carry labels (the answer)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(5, 15, (1,), generator=generator))
        ids = torch.randint(1, 64, (length,), generator=generator)
        labels = ids.clone()
        labels[:length - int(torch.randint(2, 5, (1,), generator=generator))] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def naive_log_prob(model, example) -> torch.Tensor:
    """log pi(y|x) of one sequence run alone: all logits, log_softmax, the answer tokens gathered and summed."""
    logits = model(example["input_ids"][None])[0]  # (T, vocab)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return sum(log_probs[t - 1, example["labels"][t]] for t in range(1, len(example["labels"]))
               if example["labels"][t] != IGNORE_INDEX)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_log_probs_equal_each_sequence_run_alone(packed):
    model, examples = tiny_model(), sequences_with_answers()
    batch = pack(examples, 64) if packed else (*collate(examples, 64), None)
    got = sequence_log_probs(model, *batch)
    expected = torch.stack([naive_log_prob(model, e) for e in examples])
    assert got.shape == (4,) and torch.allclose(got, expected, atol=1e-5)


def test_lora_disabled_is_exactly_the_base_model_and_switches_back_on():
    base = tiny_model(lora=False)
    model = copy.deepcopy(base)
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets=("q", "v"))
    for module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B, std=0.2)
    idx = torch.randint(0, 64, (2, 9))
    with_lora = model(idx)
    with lora_disabled(model):
        assert torch.equal(model(idx), base(idx))  # W0 x exactly: the reference
    assert torch.equal(model(idx), with_lora) and not torch.allclose(with_lora, base(idx))  # switched on again
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        with lora_disabled(model):
            pass


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_step_equals_the_definition_loss_rewards_and_lora_gradients(packed):
    """Two pairs in one micro batch (chosen answers, then rejected ones): the summed loss, TRL's four reward
    figures and the LoRA gradients, against the definition computed the plain way, within 1e-5 in fp32."""
    model, beta, smoothing = tiny_model(), 0.1, 0.1
    reference = tiny_model(lora=False)  # the same W0: tiny_model draws the base weights first
    chosen, rejected = sequences_with_answers(1, 2), sequences_with_answers(2, 2)
    batch = pack(chosen + rejected, 64) if packed else (*collate(chosen + rejected, 64), None)
    objective = dpo_objective(beta, smoothing)
    total, figures = objective.loss(model, *batch)
    assert objective.units(batch[1], batch[2]) == 2
    total.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    model.zero_grad()

    expected_total, rewards = 0.0, []
    for c, r in zip(chosen, rejected):
        policy_c, policy_r = naive_log_prob(model, c), naive_log_prob(model, r)
        with torch.no_grad():
            ref_c, ref_r = naive_log_prob(reference, c), naive_log_prob(reference, r)
        margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
        expected_total = expected_total - (1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
        rewards.append((float(beta * (policy_c - ref_c).detach()), float(beta * (policy_r - ref_r).detach())))
    expected_total.backward()
    assert float(total.detach()) == pytest.approx(float(expected_total.detach()), abs=1e-5)
    with torch.no_grad():  # the same in Python floats, as the paper writes it
        paper = sum(paper_loss(*[float(x) for x in (naive_log_prob(model, c), naive_log_prob(model, r),
                                                     naive_log_prob(reference, c), naive_log_prob(reference, r))],
                               beta, smoothing) for c, r in zip(chosen, rejected))
    assert float(total.detach()) == pytest.approx(paper, abs=1e-5)
    assert float(figures["rewards/chosen"]) == pytest.approx(sum(c for c, _ in rewards), abs=1e-5)
    assert float(figures["rewards/rejected"]) == pytest.approx(sum(r for _, r in rewards), abs=1e-5)
    assert float(figures["rewards/margins"]) == pytest.approx(sum(c - r for c, r in rewards), abs=1e-5)
    assert float(figures["rewards/accuracies"]) == sum(c > r for c, r in rewards)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(ours[name], p.grad, atol=1e-5), name
    assert any(g.abs().sum() > 0 for g in ours.values())


def test_combined_lora_is_the_sum_of_the_two_updates():
    """A supervised LoRA merged, then a DPO LoRA on top (other targets, other r): one LoRA of rank r1 + r2."""
    first = tiny_model(seed=0)  # q, v, o; r 2, alpha 4
    second = tiny_model(seed=0, lora=False)
    apply_lora(second, r=3, alpha=5, dropout=0.0, targets=("q", "k"))
    for module in lora_modules(second):
        torch.nn.init.normal_(module.lora_B, std=0.2)
    one, two = lora_state_dict(first), lora_state_dict(second)
    config, tensors = combined_lora(second, first.lora_config, one, second.lora_config, two)
    assert config == LoRAConfig(r=5, alpha=5, dropout=0.0, targets=("q", "k", "v", "o"))
    combined = tiny_model(seed=0, lora=False)
    apply_lora(combined, r=5, alpha=5, dropout=0.0, targets=config.targets)
    combined.load_state_dict(tensors, strict=False)
    expected = tiny_model(seed=0, lora=False)  # W0 + (4/2) B1 A1 + (5/3) B2 A2, written out
    with torch.no_grad():
        for prefix, parent, name in target_linears(expected, config.targets):
            for tensors_of, scaling in ((one, 4 / 2), (two, 5 / 3)):
                if f"{prefix}.lora_A" in tensors_of:
                    getattr(parent, name).weight += scaling * tensors_of[f"{prefix}.lora_B"] @ \
                        tensors_of[f"{prefix}.lora_A"]
    idx = torch.randint(0, 64, (2, 9))
    assert torch.allclose(combined(idx), expected(idx), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Preference data


def write_pairs(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [{"prompt": f"Repeat the word twice: {w}", "chosen": f"{w} {w}", "rejected": w} for w in WORDS] + \
        [{"prompt": f"Say the word {w}.", "chosen": w, "rejected": f"The lazy dog {w}"} for w in WORDS]


def prepare_pair_data(folder: Path, checkpoint_dir: Path, **flags) -> Path:
    from prepare_data.preference import PreferenceArgs, main

    data_file = write_pairs(folder / "pairs.jsonl", PAIRS)
    main(PreferenceArgs(data_file=data_file, checkpoint_dir=checkpoint_dir, destination_path=folder / "pairs",
                        test_split_size=4, **flags))
    return folder / "pairs"


def answer_text(tokenizer, example) -> str:
    return tokenizer.decode(example["input_ids"][example["labels"] != IGNORE_INDEX])


def test_a_pair_shares_its_prompt_and_carries_loss_on_the_answers_only(tokenizer, tokenizer_path, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    data_dir = prepare_pair_data(tmp_path, checkpoint)
    train, test, config = load_pairs(data_dir, tokenizer)
    assert config["kind"] == "preference" and len(train) == 20 and len(test) == 4
    for pair in train:
        c, r = pair["chosen"], pair["rejected"]
        prompt_c, prompt_r = (int((e["labels"] != IGNORE_INDEX).nonzero()[0]) for e in (c, r))
        assert prompt_c == prompt_r and torch.equal(c["input_ids"][:prompt_c], r["input_ids"][:prompt_r])
        assert c["input_ids"][-1] == tokenizer.eos_id and r["input_ids"][-1] == tokenizer.eos_id  # where it stops
        assert (c["labels"][prompt_c:] == c["input_ids"][prompt_c:]).all()
        assert {answer_text(tokenizer, c), answer_text(tokenizer, r)} in [{p["chosen"], p["rejected"]} for p in PAIRS]


def test_conversational_pairs_mask_the_prompts_own_assistant_turns(smollm2_tokenizer_dir):
    from lit_lora.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_tokenizer_dir)
    prompt = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"},
              {"role": "user", "content": "Now say dog."}]
    explicit = preference_record({"prompt": prompt, "chosen": [{"role": "assistant", "content": "dog"}],
                                  "rejected": [{"role": "assistant", "content": "cat cat"}]}, "here")
    implicit = preference_record({"chosen": prompt + [{"role": "assistant", "content": "dog"}],
                                  "rejected": prompt + [{"role": "assistant", "content": "cat cat"}]}, "here")
    assert explicit == implicit  # TRL's implicit prompt: the turns both share
    pair = tokenize_pair(explicit, tokenizer, 128, 64, "chatml")
    end_of_turn = single_token_id(tokenizer, "<|im_end|>")
    for key, words in (("chosen", "dog"), ("rejected", "cat cat")):
        labels = pair[key]["labels"]
        assert answer_text(tokenizer, pair[key]).strip() == words  # the last answer only (not the prompt's "cat")
        assert labels[labels != IGNORE_INDEX][-1] == end_of_turn  # and where it stops


def test_a_long_pair_keeps_its_prompts_end_and_bos(tokenizer, tokenizer_path, tmp_path):
    long_prompt = " ".join(f"The model reads {i} + {i} = {2 * i}." for i in range(12)) + " Say the word cat."
    rejected = "The lazy dog jumps over the quick brown fox, and the teacher explains two numbers."
    pair = preference_record({"prompt": long_prompt, "chosen": "cat", "rejected": rejected}, "here")
    whole = tokenize_pair(pair, tokenizer, 1000, 500, "alpaca")
    prompt = int((whole["chosen"]["labels"] != IGNORE_INDEX).nonzero()[0])
    longest = max(len(whole[key]["input_ids"]) for key in ("chosen", "rejected"))
    limit = longest - prompt + 70  # room for a 70-token prompt and the answers whole
    cut = tokenize_pair(pair, tokenizer, limit, 40, "alpaca")
    assert not whole["cut"] and cut["cut"] and prompt > 200
    for key in ("chosen", "rejected"):
        full, short = whole[key], cut[key]
        assert len(short["input_ids"]) <= limit and short["input_ids"][0] == tokenizer.bos_id
        assert int((short["labels"] != IGNORE_INDEX).nonzero()[0]) == 70
        answer = int((full["labels"] != IGNORE_INDEX).nonzero()[0])  # the answer and the prompt's end are kept whole
        kept = len(short["input_ids"]) - (len(full["input_ids"]) - answer)
        assert torch.equal(short["input_ids"][kept:], full["input_ids"][answer:])
        assert torch.equal(short["input_ids"][1:kept], full["input_ids"][answer - kept + 1:answer])
    # the prompt is cut no further than max_prompt_length: then the longer answer loses its end, and its EOS
    tight = prompt // 3  # a prompt over 4 contexts long would be left out: this one is 3
    short = tokenize_pair(pair, tokenizer, tight, tight - 10, "alpaca")
    long_answer = len(whole["rejected"]["input_ids"]) - prompt
    assert long_answer > 10  # so it must be cut
    for key in ("chosen", "rejected"):
        assert int((short[key]["labels"] != IGNORE_INDEX).nonzero()[0]) == tight - 10  # the prompt kept
    assert len(short["rejected"]["input_ids"]) == tight and short["rejected"]["input_ids"][-1] != tokenizer.eos_id
    assert short["chosen"]["input_ids"][-1] == tokenizer.eos_id  # short enough to stay whole
    assert tokenize_pair(pair, tokenizer, prompt // 5, 10, "alpaca") is None  # the prompt is over 4 contexts long


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "record 1 (line 2): missing the field rejected"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "record 1 (line 2): chosen and rejected are the same"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Hello"}, "record 1 (line 2): the chosen is empty"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "three strings or three"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "every turn of chosen must be the assistant's"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}, "share no first"),
])
def test_a_bad_record_is_named_with_its_line(tmp_path, record, message):
    path = write_pairs(tmp_path / "pairs.jsonl", [PAIRS[0], record])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_preference_records(path)


# ---------------------------------------------------------------------------------------------------------
# finetune/dpo.py


def dpo_args(checkpoint_dir, data_dir, out_dir, **overrides):
    from finetune.dpo import DPOArgs

    values = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, precision="32-true",
                  learning_rate=1e-2, global_batch_size=4, micro_batch_size=2, max_steps=6, warmup_steps=1,
                  eval_interval=3, eval_examples=4, eval_max_new_tokens=0, save_interval=3, lora_r=4,
                  lora_targets=("q", "v"))
    values.update(overrides)
    return DPOArgs(**values)


@pytest.fixture
def pair_setup(tmp_path, tokenizer_path):
    checkpoint = make_checkpoint(tmp_path / "base", tokenizer_path, block_size=256)
    return checkpoint, prepare_pair_data(tmp_path, checkpoint)


def test_dpo_learns_the_preference_and_writes_an_ordinary_lora_file(pair_setup, tmp_path, tokenizer):
    from finetune.dpo import main

    checkpoint, data_dir = pair_setup
    summary = main(dpo_args(checkpoint, data_dir, tmp_path / "out"))
    out = tmp_path / "out"
    assert logged(out, "loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: pi = ref, every pair log 2
    assert logged(out, "rewards/accuracies")[0] == 0.0  # every reward 0: no pair is ahead yet
    assert logged(out, "val_rewards/accuracies")[-1] >= 0.75 and logged(out, "val_rewards/margins")[-1] > 0
    assert summary["final_loss"] < math.log(2)
    data = read_lora_file(out / "lit_lora_finetuned.pth")
    assert data["training"] == {"method": "dpo", "beta": 0.1, "label_smoothing": 0.0, "init_lora": None}
    assert data["prompt"]["style"] == "alpaca"
    model = load_lora(LLaMA(Config(**data["base_config"])), out / "lit_lora_finetuned.pth")  # loads as any LoRA file
    assert model.lora_config.r == 4


def test_dpo_resumes_bit_for_bit_after_ctrl_c(pair_setup, tmp_path, monkeypatch):
    from finetune.dpo import main

    checkpoint, data_dir = pair_setup
    full = main(dpo_args(checkpoint, data_dir, tmp_path / "full"))
    train_module = importlib.import_module("lit_lora.train")
    real = interrupt_at(monkeypatch, train_module, "forward_backward", 5)  # in step 5, after step 3 was saved
    with pytest.raises(SystemExit) as exit_info:
        main(dpo_args(checkpoint, data_dir, tmp_path / "resumed"))
    assert exit_info.value.code == 130 and not hidden_leftovers(tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "state.pth", weights_only=True)["step"] == 4
    monkeypatch.setattr(train_module, "forward_backward", real)
    resumed = main(dpo_args(checkpoint, data_dir, tmp_path / "resumed", resume="auto"))
    assert resumed["final_loss"] == full["final_loss"]
    a = read_lora_file(tmp_path / "full" / "lit_lora_finetuned.pth")["lora"]
    b = read_lora_file(tmp_path / "resumed" / "lit_lora_finetuned.pth")["lora"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_dpo_from_a_supervised_lora_makes_it_the_reference_and_the_file_holds_both(pair_setup, tmp_path):
    from finetune.dpo import main

    checkpoint, data_dir = pair_setup
    supervised = load_model(checkpoint)
    apply_lora(supervised, r=2, alpha=4, dropout=0.0, targets=("q", "o"))
    for module in lora_modules(supervised):
        torch.nn.init.normal_(module.lora_B, std=0.2)
    save_lora(supervised, tmp_path / "sft.pth")
    main(dpo_args(checkpoint, data_dir, tmp_path / "out", init_lora_path=tmp_path / "sft.pth"))
    assert logged(tmp_path / "out", "loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # ref = the supervised model
    data = read_lora_file(tmp_path / "out" / "lit_lora_finetuned.pth")
    assert LoRAConfig(**data["lora_config"]) == LoRAConfig(r=6, alpha=6, dropout=0.0, targets=("q", "v", "o"))
    assert data["training"]["init_lora"]["r"] == 2 and data["training"]["init_lora"]["merged_into_this_file"]


def test_each_script_refuses_the_other_kind_of_data(pair_setup, tmp_path, tokenizer):
    from finetune.dpo import main as dpo_main
    from finetune.lora import main as lora_main
    from tests.conftest import lora_args

    checkpoint, pair_dir = pair_setup
    with pytest.raises(ValueError, match="holds preference pairs .* finetune/dpo.py"):
        lora_main(lora_args(checkpoint, pair_dir, tmp_path / "lora"))
    prepare([{"instruction": "Say the word.", "input": "", "output": w} for w in WORDS], tokenizer, tmp_path / "sft",
            max_seq_length=256, test_split_size=2)
    with pytest.raises(ValueError, match="not preference pairs: prepare .* prepare_data/preference.py"):
        dpo_main(dpo_args(checkpoint, tmp_path / "sft", tmp_path / "dpo"))


def test_evaluate_scores_pairs_by_the_models_own_preference(pair_setup):
    from lit_lora.evaluate_data import EvaluateArgs, run_evaluation  # what evaluate/base.py runs

    checkpoint, data_dir = pair_setup
    result = run_evaluation(load_model(checkpoint), EvaluateArgs(checkpoint_dir=checkpoint, data_dir=data_dir))
    result = result["test_split"]
    _, test, _ = load_pairs(data_dir)
    model = load_model(checkpoint).float().eval()
    with torch.no_grad():
        margins = [float(sequence_log_probs(model, *collate([p["chosen"]], 256)) -
                         sequence_log_probs(model, *collate([p["rejected"]], 256))) for p in test]
    assert result["pairs"] == 4 and result["preferred"] == sum(m > 0 for m in margins)
    assert result["margin"] == pytest.approx(sum(margins) / 4, abs=1e-4)


def test_dpo_on_a_4bit_base_switches_its_lora_off_too(pair_setup, tmp_path):
    """QLoRA's LoRA layer (lit_lora/quantize.py) is LoRALinear's subclass: the reference is the 4-bit base itself."""
    from finetune.dpo import main
    from lit_lora.quantize import load_model_4bit

    checkpoint, data_dir = pair_setup
    base, model = load_model_4bit(checkpoint, "bnb.nf4"), load_model_4bit(checkpoint, "bnb.nf4")
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets=("q", "v"))
    for module in lora_modules(model):
        torch.nn.init.normal_(module.lora_B, std=0.2)
    idx = torch.randint(0, 64, (1, 9))
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(model(idx), base(idx))
    main(dpo_args(checkpoint, data_dir, tmp_path / "out", quantize="bnb.nf4", max_steps=2, eval_interval=0))
    assert logged(tmp_path / "out", "loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    data = read_lora_file(tmp_path / "out" / "lit_lora_finetuned.pth")
    assert data["quantization"] == "bnb.nf4" and data["training"]["method"] == "dpo"
