import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_lora.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from lit_lora.method_files import load_lora, read_lora_file, save_lora
from lit_lora.model import Config, LLaMA
from lit_lora.report import num_parameters


def base_model(name="micro", seed=0, **overrides):
    torch.manual_seed(seed)
    return LLaMA(Config.from_name(name, **overrides))


def randomize_lora(model, seed=1):
    """A trained LoRA has B != 0; give it random values so merges and saves have something to move."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


@pytest.mark.parametrize("train_mode", [False, True])
def test_fresh_lora_model_equals_base_exactly(train_mode):
    model = base_model()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model.eval()(idx)
        apply_lora(model, r=4, alpha=8, dropout=0.5, targets=("q", "k", "v", "o", "gate", "up", "down", "head"))
        model.train(train_mode)  # dropout only touches the LoRA path, whose B is zero
        assert torch.equal(model(idx), reference)


def test_layer_computes_w0_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=False)
    lora = LoRALinear(linear, r=2, alpha=6, dropout=0.0)
    assert lora.weight is linear.weight and not lora.weight.requires_grad  # W0 is shared, not copied, and frozen
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 6)
    expected = x @ linear.weight.T + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)  # scaling = alpha / r = 3
    assert torch.allclose(lora(x), expected, atol=1e-6)
    assert lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2)


def test_merge_equals_unmerged_and_is_idempotent():
    model = base_model().eval()
    apply_lora(model, targets=("q", "v", "down", "head"))
    randomize_lora(model)
    w0 = model.blocks[0].attn.q_proj.weight.clone()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
        merge_lora(model)  # a second merge changes nothing
        merged_twice = model(idx)
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert torch.equal(merged, merged_twice)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, w0)
    unmerge_lora(model)
    unmerge_lora(model)
    assert (model.blocks[0].attn.q_proj.weight - w0).abs().max().item() < 1e-6
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


def test_only_lora_tensors_change_in_an_optimizer_step():
    model = base_model()
    apply_lora(model, targets=("q", "v", "head"))
    mark_only_lora_as_trainable(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 256, (2, 12))
    for _ in range(2):  # at step 1 only B moves (A's gradient is B^T ... = 0); at step 2 both do
        logits = model(idx)
        F.cross_entropy(logits[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # bit-identical W0, norms, embeddings


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "o", "head"), tuple(LORA_TARGETS)])
def test_trainable_parameter_count(targets):
    model = base_model()
    r = 4
    shapes = []  # (d_in, d_out) of every adapted matrix
    for target in targets:
        if target == "head":
            shapes.append((model.lm_head.in_features, model.lm_head.out_features))
        else:
            for block in model.blocks:
                linear = block.get_submodule(LORA_TARGETS[target])
                shapes.append((linear.in_features, linear.out_features))
    apply_lora(model, r=r, targets=targets)
    mark_only_lora_as_trainable(model)
    assert num_parameters(model, trainable=True) == sum(r * (d_in + d_out) for d_in, d_out in shapes)


def test_7b_with_r8_on_q_and_v_trains_4_2_million_parameters():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("7B"))
    apply_lora(model, r=8, targets=("q", "v"))
    mark_only_lora_as_trainable(model)
    assert num_parameters(model, trainable=True) == 4_194_304  # 32 layers * 2 * 8 * (4096 + 4096)
    assert num_parameters(model, trainable=False) == 6_738_415_616


def test_bad_targets_and_double_application():
    with pytest.raises(ValueError, match="valid targets are q, k, v, o, gate, up, down, head"):
        apply_lora(base_model(), targets=("q", "query"))
    model = apply_lora(base_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), r"^r=0: the rank must be a whole number, at least 1$"),
    (dict(r=2.5), r"^r=2.5: "),
    (dict(alpha=0), r"^alpha=0: must be a positive, finite number"),
    (dict(alpha=float("nan")), r"^alpha=nan: "),
    (dict(dropout=1.0), r"^dropout=1.0: must be at least 0 and below 1$"),
    (dict(targets="qv"), r"^targets='qv': must be a list"),
    (dict(r=17), r"^r=17: must be at most 16, the smallest side of the targeted matrices"),  # micro: v is 32 -> 16
])
def test_bad_hyperparameters_name_the_python_parameter(kwargs, message):
    """From Python, an error names the parameter as it was passed (the scripts name their flags instead)."""
    model = base_model()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing applied


def test_merge_rounds_once_to_the_weight_dtype():
    """W = round(W0 + scaling B A) in one rounding: the update is computed in fp32 and added to W0 in fp32. Casting
    the update to bf16 first and adding in bf16 rounds twice, and lands elsewhere for a few % of the entries."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1024, bias=False).to(torch.bfloat16)
    lora = LoRALinear(linear, r=8, alpha=16)
    torch.nn.init.normal_(lora.lora_B, std=0.02)
    w0 = linear.weight.detach().clone()
    once = (w0.float() + (lora.lora_B.float() @ lora.lora_A.float()) * 2.0).to(torch.bfloat16)
    lora.merge()
    assert torch.equal(lora.weight, once)


def test_training_mode_unmerges_so_a_and_b_get_their_gradient():
    """A merged layer computes W x with A and B outside the product: model.train() unmerges (as loralib does), so a
    training step after generating with a merged model trains A and B, and computes what the unmerged model does."""
    model = apply_lora(base_model(), r=4, dropout=0.0, targets=("q", "v"))  # no dropout: train() = eval()
    randomize_lora(model)
    mark_only_lora_as_trainable(model)
    idx = torch.randint(0, 256, (2, 12))
    expected = model.eval()(idx)
    merge_lora(model)
    model.train()
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    logits = model(idx)
    assert torch.allclose(logits, expected, atol=1e-5)
    logits.sum().backward()
    grads = [m.lora_A.grad for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_round_trip_needs_no_repeated_flags(tmp_path):
    model = apply_lora(base_model(), r=4, alpha=32, dropout=0.1, targets=("q", "k", "up"))
    randomize_lora(model)
    save_lora(model, tmp_path / "lora.pth")
    saved = read_lora_file(tmp_path / "lora.pth")
    assert set(saved["lora"]) == set(lora_state_dict(model)) and all("lora_" in k for k in saved["lora"])
    assert saved["lora_config"] == {"r": 4, "alpha": 32, "dropout": 0.1, "targets": ("q", "k", "up")}

    fresh = load_lora(base_model(), tmp_path / "lora.pth")  # the same base weights, no LoRA flags
    assert fresh.lora_config == model.lora_config
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx), model.eval()(idx))
    assert list(tmp_path.iterdir()) == [tmp_path / "lora.pth"]  # written atomically, no temporary left


def test_mismatched_loads_fail_clearly(tmp_path):
    model = apply_lora(base_model())
    save_lora(model, tmp_path / "lora.pth")
    with pytest.raises(ValueError, match="n_embd is 32, this model's is 64"):
        load_lora(base_model(n_embd=64), tmp_path / "lora.pth")

    checkpoint = torch.load(tmp_path / "lora.pth", weights_only=True)
    checkpoint["lora"]["blocks.1.attn.v_proj.lora_A"] = torch.zeros(8, 31)
    torch.save(checkpoint, tmp_path / "edited.pth")
    untouched = base_model()
    with pytest.raises(ValueError, match=r"blocks.1.attn.v_proj.lora_A has shape \(8, 31\).*\(8, 32\)"):
        load_lora(untouched, tmp_path / "edited.pth")
    assert not hasattr(untouched, "lora_config") and not any(isinstance(m, LoRALinear) for m in untouched.modules())

    del checkpoint["lora"]["blocks.1.attn.v_proj.lora_A"]
    torch.save(checkpoint, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing tensors.*blocks.1.attn.v_proj.lora_A"):
        load_lora(base_model(), tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="finetune/lora.py"):
        load_lora(base_model(), tmp_path / "nothing.pth")


def test_loading_into_a_merged_model_is_refused_and_switching_goes_through_unmerge(tmp_path):
    """Loading a LoRA file into a model whose LoRA is merged would keep the old update in W, and a later
    unmerge would subtract the new one: W0 corrupted. It is refused; unmerge, load, merge switches exactly."""
    torch.manual_seed(0)
    first, second = apply_lora(base_model()), apply_lora(base_model())
    for model, seed in ((first, 1), (second, 2)):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.1)
    save_lora(first, tmp_path / "first.pth")
    save_lora(second, tmp_path / "second.pth")

    model = load_lora(base_model(), tmp_path / "first.pth")
    w0 = {name: t.clone() for name, t in model.state_dict().items() if "lora_" not in name}
    merge_lora(model)
    with pytest.raises(ValueError, match="into a model whose LoRA is merged.*unmerge_lora"):
        load_lora(model, tmp_path / "second.pth")
    unmerge_lora(model)
    load_lora(model, tmp_path / "second.pth")
    merge_lora(model)
    idx = torch.randint(0, 256, (2, 8))
    reference = load_lora(base_model(), tmp_path / "second.pth").eval()
    assert torch.allclose(model.eval()(idx), reference(idx), atol=1e-5)
    unmerge_lora(model)
    assert all(torch.allclose(model.state_dict()[name], w, atol=1e-6) for name, w in w0.items())


def edited_lora_file(tmp_path, edit) -> "Path":
    """A LoRA file as save_lora writes it, then changed by `edit(dict)` and saved again."""
    save_lora(apply_lora(base_model(), r=4), tmp_path / "lora.pth")
    data = torch.load(tmp_path / "lora.pth", weights_only=True)
    edit(data)
    torch.save(data, tmp_path / "edited.pth")
    return tmp_path / "edited.pth"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["lora_config"].pop("r"), r"lora_config holds \['alpha', 'dropout', 'targets'\], expected the fields"),
    (lambda d: d["lora_config"].update(alpha="16"), r"lora_config's alpha is '16': must be a positive, finite number"),
    (lambda d: d["lora_config"].update(dropout=5.0), r"lora_config's dropout is 5.0: must be at least 0 and below 1"),
    (lambda d: d.update(lora_config=[4, 16]), r"lora_config holds a list, expected the fields"),
    (lambda d: d.update(base_config=3), r"base_config is not a model config"),
    (lambda d: d["base_config"].update(n_layer=2.5), r"base_config is not a model config \(n_layer=2.5"),
    (lambda d: d.update(quantization="bnb.int3"), r"quantization is 'bnb.int3', not one of bnb.nf4, bnb.nf4-dq"),
    (lambda d: d["lora"]["blocks.0.attn.q_proj.lora_B"].fill_(float("nan")),
     r"the tensor blocks.0.attn.q_proj.lora_B holds NaN or infinite values"),
    (lambda d: d["lora"].update({"blocks.0.attn.q_proj.lora_A": torch.zeros(4, 32, dtype=torch.int32)}),
     r"the tensor blocks.0.attn.q_proj.lora_A holds torch.int32, not floats"),
])
def test_a_lora_file_is_checked_field_by_field(tmp_path, edit, message):
    """A LoRA file is checked as an adapter file is: each problem is one error naming the file and the field (never
    a flag the user did not pass, nor a bare KeyError), and the model is left untouched."""
    path = edited_lora_file(tmp_path, edit)
    model = base_model()
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {message}.*finetune/lora.py"):
        load_lora(model, path)
    assert not hasattr(model, "lora_config")


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", "pickle"])
def test_an_empty_truncated_or_code_running_lora_file_is_one_error(tmp_path, content):
    path = tmp_path / "lora.pth"
    if content == "pickle":
        torch.save({"lora": RunsCode()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} cannot be read as a LoRA file .*damaged"):
        load_lora(base_model(), path)
