"""Direct Preference Optimization (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) with LoRA.

The data are pairs: a prompt x, an answer people preferred y_w (chosen) and one they did not, y_l (rejected)
(lit_lora/preference.py). RLHF would fit a reward model to them, then maximise that reward with PPO while a KL term
keeps the policy pi near a reference model (the supervised one). DPO's observation: the best policy of that problem
defines its own reward, r(x, y) = beta log pi(y|x) / ref(y|x) (+ a term of x alone, which cancels in a pair), so the
reward model's loss on the pairs can be written in pi directly, and minimised like any loss:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

- log pi(y|x) is the sum of the log-probabilities of the answer's tokens (the prompt carries no loss).
- beta (0.1 by default, as in TRL) is the KL term's weight: a smaller beta lets pi drift further from ref.
- At the start pi = ref, every reward is 0 and the loss is log 2 = 0.693 for every pair.
- The figures TRL logs: rewards/chosen and rewards/rejected (the mean of beta log pi/ref over the pairs),
  rewards/accuracies (the share of pairs whose chosen answer has the higher reward), rewards/margins (the mean
  difference). A run learns the preference when accuracy rises and the margins grow.
- label_smoothing e (conservative DPO, Mitchell 2023): each label is taken to be wrong with probability e, so the
  loss is (1 - e) of the above plus e of the same with chosen and rejected swapped.

The reference costs nothing here. With LoRA, pi is W0 + B A and ref is W0: the same modules with the LoRA update
switched off (lora.lora_disabled), never a second copy of the weights. The reference's log-probabilities are computed
in each step, under no_grad, one more forward pass per sequence: precomputing them once would save that pass in a
second epoch, but would have to be kept with the data, and kept right when the data or the base change; computed in
the step they are right by construction, cost no memory beyond the pass itself, and leave resuming as it is. With
--init_lora_path a supervised LoRA is merged into W0 first: the reference is the supervised model, and the new LoRA
learns the preference on top of it. The file saved holds both updates as one LoRA (rank r1 + r2, `combined_lora`):
an ordinary LoRA file of the base model, which every generate, evaluate and export script takes as it is.
"""

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.checkpoint import save_method_file
from lit_lora.data import IGNORE_INDEX
from lit_lora.files import file_sha256
from lit_lora.lora import LORA_TARGETS, LoRAConfig, lora_disabled, merge_lora, target_linears
from lit_lora.method_files import load_lora, read_lora_file
from lit_lora.model import LLaMA
from lit_lora.train import Objective, label_log_probs


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       lengths: Optional[list[int]] = None) -> torch.Tensor:
    """log pi(y|x) of every sequence of the micro batch: the sum of its answer tokens' log-probabilities. (S,), S
    the rows (right-padded) or the examples of the packed row (`lengths`)."""
    token_log_probs = label_log_probs(model, input_ids, labels, lengths)  # (N,): the label tokens, row by row
    if lengths is None:  # which sequence each position belongs to: its row
        owner = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)  # (B, T)
    else:  # a packed row: the examples one after another
        owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(labels.device)
    owners = owner[:, 1:][labels[:, 1:] != IGNORE_INDEX]  # (N,): the sequence of each label token
    sequences = len(labels) if lengths is None else len(lengths)
    return torch.zeros(sequences, device=labels.device, dtype=token_log_probs.dtype).index_add(0, owners,
                                                                                              token_log_probs)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of each pair, and the implicit rewards beta log pi(y|x) / ref(y|x) of its chosen and rejected answers
    (detached). Inputs: (P,) log-probabilities of the P pairs' answers."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards  # beta ((log pi - log ref)(y_w) - (log pi - log ref)(y_l))
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_objective(beta: float = 0.1, label_smoothing: float = 0.0) -> Objective:
    """DPO as the training loop's objective (lit_lora/train.py): a micro batch holds its pairs' chosen answers, then
    their rejected ones (train.sequences); the loss and TRL's four reward figures are summed over its pairs."""

    def loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
             lengths: Optional[list[int]]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), lora_disabled(model):  # ref: the same modules, W0 alone
            reference = sequence_log_probs(model, input_ids, labels, lengths)
        policy = sequence_log_probs(model, input_ids, labels, lengths)  # pi: W0 + B A
        losses, chosen, rejected = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta, label_smoothing)
        return losses.sum(), {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                              "rewards/accuracies": (chosen > rejected).float().sum(),
                              "rewards/margins": (chosen - rejected).sum()}

    def pairs(labels: torch.Tensor, lengths: Optional[list[int]]) -> int:
        return (len(labels) if lengths is None else len(lengths)) // 2

    return Objective(loss, pairs, pairs=True)


# ---------------------------------------------------------------------------------------------------------
# Starting from a supervised LoRA, and the file saved


def merge_init_lora(model: LLaMA, path: Union[str, Path]) -> dict:
    """Merge the LoRA file at `path` into the model's weights, W0 <- W0 + B A, and take its modules away, so that
    a new LoRA can be applied: the reference of DPO becomes the supervised model. Returns the file's dict."""
    data = read_lora_file(path)
    load_lora(model, path)  # every check of a LoRA file: its base model, its tensors
    merge_lora(model)
    for _, parent, name in target_linears(model, model.lora_config.targets):
        lora = getattr(parent, name)
        plain = nn.Linear(lora.in_features, lora.out_features, bias=False, device="meta")
        plain.weight = lora.weight  # W0 + B A now, frozen
        setattr(parent, name, plain)
    del model.lora_config
    return data


def combined_lora(model: LLaMA, first: LoRAConfig, first_tensors: dict, second: LoRAConfig,
                  second_tensors: dict) -> tuple[LoRAConfig, dict]:
    """One LoRA whose update is the sum of two: s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] [A1; A2], of rank r1 + r2, on
    the targets of either (zeros where one has none), with alpha = r (scaling 1: each B carries its own)."""
    targets = tuple(t for t in LORA_TARGETS if t in first.targets or t in second.targets)
    r = first.r + second.r
    tensors = {}
    for prefix, parent, name in target_linears(model, targets):
        linear = getattr(parent, name)
        halves_A, halves_B = [], []
        for config, part in ((first, first_tensors), (second, second_tensors)):
            A = part.get(f"{prefix}.lora_A", torch.zeros(config.r, linear.in_features))
            B = part.get(f"{prefix}.lora_B", torch.zeros(linear.out_features, config.r))
            halves_A.append(A.float())
            halves_B.append(B.float() * (config.alpha / config.r))
        dtype = second_tensors[next(iter(second_tensors))].dtype
        tensors[f"{prefix}.lora_A"] = torch.cat(halves_A, dim=0).to(dtype)  # (r1 + r2, d_in)
        tensors[f"{prefix}.lora_B"] = torch.cat(halves_B, dim=1).to(dtype)  # (d_out, r1 + r2)
    return LoRAConfig(r=r, alpha=r, dropout=second.dropout, targets=targets), tensors


def save_dpo_lora(model: LLaMA, path: Union[str, Path], trained: dict, beta: float, label_smoothing: float,
                  init: Optional[tuple[Path, dict]] = None) -> None:
    """An ordinary LoRA file (method_files.load_lora reads it) that records how it was trained: method dpo, beta,
    label_smoothing and the supervised LoRA it started from, whose update it holds (`combined_lora`)."""
    config, tensors = model.lora_config, {name: t for name, t in trained.items() if "lora_" in name}
    record = {"method": "dpo", "beta": beta, "label_smoothing": label_smoothing, "init_lora": None}
    if init is not None:
        init_path, init_data = init
        init_config = LoRAConfig(**init_data["lora_config"])
        config, tensors = combined_lora(model, init_config, init_data["lora"], config, tensors)
        record["init_lora"] = {"path": str(init_path), "sha256": file_sha256(init_path), "r": init_config.r,
                               "merged_into_this_file": True}
    save_method_file(path, "lora", tensors, config, model, quantization=getattr(model, "quantization", None),
                     prompt=getattr(model, "prompt_format", None), training=record)
