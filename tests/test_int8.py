"""8-bit decoding (lit_lora/int8.py, --quantize int8): llama.cpp's Q8_0 blocks bit for bit, products equal to those
of the dequantized weights, and the greedy tokens of the model whose weights are those blocks dequantized."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_lora.checkpoint import load_model, save_checkpoint_dir
from lit_lora.generation import generate
from lit_lora.inference import compile_decoding, fuse_for_inference
from lit_lora.int8 import Int8Embedding, Int8Linear, dequantize_q8_0, int8_matvec, quantize_int8, quantize_q8_0
from tests.test_inference import decode


def test_q8_0_blocks_are_llama_cpp_s_bit_for_bit():
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[gguf]'): no llama.cpp reference")
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * 0.05
    weight[3, :32] = 0  # an all-zero block: d = 0, q = 0
    weight[5, 32:64] = torch.tensor([127.0, 0.5, -2.5, 1.5] + [0.25] * 28)  # d = 1: halves round away from zero
    q, scale = quantize_q8_0(weight)
    raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(48, 3, 34)  # d (2 bytes), 32 q
    assert np.array_equal(scale.numpy(), raw[..., :2].copy().view(np.float16)[..., 0])
    assert np.array_equal(q.numpy(), raw[..., 2:].copy().view(np.int8).reshape(48, 96))
    assert q[5, 33:36].tolist() == [1, -3, 2] and q[3, :32].abs().sum() == 0 and scale[3, 0] == 0
    dequantized = dequantize_q8_0(q, scale)
    assert torch.equal(dequantized, torch.from_numpy(gguf.quants.dequantize(raw.reshape(48, -1),
                                                                            gguf.GGMLQuantizationType.Q8_0)))
    error = (weight - dequantized).abs().reshape(48, 3, 32).amax(-1)
    # within half a step of its block, plus what storing d in fp16 (11 bits) moves a q of up to 127: 127 d / 2^11
    assert (error <= scale.float() * (0.5 + 127 / 2**11)).all()


def test_int8_products_equal_those_of_the_dequantized_weights(monkeypatch):
    import lit_lora.int8 as int8

    torch.manual_seed(0)
    q, scale = quantize_q8_0(torch.randn(80, 96))
    layer, weight = Int8Linear(q, scale), dequantize_q8_0(q, scale)
    compiled = torch.compile(int8_matvec, dynamic=False, fullgraph=True)
    for shape in ((96,), (1, 96), (1, 1, 96), (3, 5, 96)):
        x = torch.randn(shape)
        assert torch.allclose(layer(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
        if x.shape[:-1].numel() == 1:  # the compiled step's one-row loop over the int8 weights
            assert torch.allclose(compiled(x, q, scale), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(int8, "ROWS_AT_ONCE", 16)  # eager: W dequantized 16 rows at a time, 80 = 5 slices
    x = torch.randn(2, 7, 96)
    assert torch.allclose(layer(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    embedding = Int8Embedding(q, scale, torch.float32)
    ids = torch.tensor([[0, 79, 5], [5, 5, 1]])
    assert torch.equal(embedding(ids), F.embedding(ids, weight))


def dequantized_copy(model):
    """`model` with every weight matrix (and the embedding) replaced by its Q8_0 blocks dequantized: the reference
    an int8 model must decode like."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.dim() == 2:
                param.copy_(dequantize_q8_0(*quantize_q8_0(param)))
    return reference


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_int8_model_decodes_the_dequantized_model_s_tokens_eager_and_compiled(checkpoint_dir, tokenizer_path,
                                                                                  tmp_path, tied, monkeypatch):
    from tests.conftest import make_checkpoint

    if tied:
        checkpoint_dir = make_checkpoint(tmp_path / "tied", tokenizer_path, tie_embeddings=True)
    plain = load_model(checkpoint_dir).eval()
    with torch.no_grad():  # weights large enough that a wrong product would change the tokens
        for param in plain.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.fill_(1.0)
    reference = dequantized_copy(plain)
    int8 = fuse_for_inference(quantize_int8(copy.deepcopy(plain)))
    assert isinstance(int8.embed, Int8Embedding) and isinstance(int8.lm_head, Int8Linear)
    assert isinstance(int8.blocks[0].attn.qkv, Int8Linear) and isinstance(int8.blocks[1].mlp.down, Int8Linear)
    assert (int8.lm_head.q is int8.embed.q) == tied  # tied: one table of int8 rows
    fp32_bytes = sum(p.numel() * 4 for p in plain.parameters())
    int8_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in
                                                            [*int8.parameters(), *int8.buffers()]}.values()
                     if t is not int8.cos and t is not int8.sin)
    assert int8_bytes <= 0.28 * fp32_bytes  # 1 byte per weight and 2 per 32 for the scales, against 4
    prompts = [torch.tensor([1, 5, 9, 13]), torch.tensor([2, 4, 6, 8, 10, 12, 14])]
    with torch.no_grad():
        expected = [generate(reference, [p], max_new_tokens=16)[0].tolist() for p in prompts]
        assert [generate(int8, [p], max_new_tokens=16)[0].tolist() for p in prompts] == expected
        assert expected != [generate(plain, [p], max_new_tokens=16)[0].tolist() for p in prompts] or tied
    if not tied:  # the compiled step, once: its loops over the int8 weights
        monkeypatch.setenv("LIT_LORA_CACHE", str(tmp_path / "cache"))
        compiled = compile_decoding(fuse_for_inference(quantize_int8(copy.deepcopy(plain)), for_compile=True))
        assert [decode(compiled, p, 64, n=16) for p in prompts] == expected
        assert compiled.compile_seconds > 0


def test_generate_with_quantize_int8_merges_lora_first_and_refuses_an_adapter(checkpoint_dir, tmp_path, capsys):
    """--quantize int8 through the generate scripts: the text of the dequantized model; an adapter: one clear line."""
    from generate.adapter import AdapterGenerateArgs
    from lit_lora.chat import GenerateArgs, run_generation

    from lit_lora.tokenizer import Tokenizer

    base = load_model(checkpoint_dir)
    reference_dir = save_checkpoint_dir(tmp_path / "dequantized", dequantized_copy(base).state_dict(), base.config,
                                        Tokenizer(checkpoint_dir).files)
    options = dict(prompt="The model", max_new_tokens=12, temperature=0.0, compile=False)
    int8 = run_generation(load_model(checkpoint_dir), GenerateArgs(checkpoint_dir=checkpoint_dir, quantize="int8", **options))
    expected = run_generation(load_model(reference_dir), GenerateArgs(checkpoint_dir=checkpoint_dir, **options))
    assert int8 == expected and int8[0]
    with pytest.raises(ValueError, match="--quantize int8: 8-bit decoding is for the base model, a LoRA"):
        AdapterGenerateArgs(quantize="int8")
