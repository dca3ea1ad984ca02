"""Hostile GGUF files (issue 32): broken tensor tables, metadata of the wrong type or out of bounds, tokenizer metadata
that makes no tokenizer, missing optional packages, and exports onto their own input. Each is one line naming the
file and the field or tensor, in bounded time and memory, and nothing is written."""

import contextlib
import signal
import struct
import sys
import tempfile
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf extra: pip install -e '.[gguf]'")

from lit_lora.convert.gguf import export_gguf_checkpoint  # noqa: E402
from tests.conftest import make_checkpoint, run_command  # noqa: E402
from tests.test_gguf import rewrite  # noqa: E402

V = gguf.GGUFValueType


class TooSlow(BaseException):
    """Raised by `within` when its time is up: a BaseException, so that no `except Exception` swallows it."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail a block that runs longer than `seconds` (a loop over a count read from the file, say)."""
    def stop(signum, frame):
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> Path:
    """A micro model with a SentencePiece tokenizer (tokenizer.ggml.model `llama`), in f32."""
    from lit_lora.tokenizer import Tokenizer
    from tests.conftest import make_corpus

    folder = tmp_path_factory.mktemp("sentencepiece-gguf")
    Tokenizer.train(make_corpus(), vocab_size=320, model_prefix=folder / "tokenizer")
    micro = make_checkpoint(folder / "lit", folder / "tokenizer.model")
    return export_gguf_checkpoint(micro, folder / "model.gguf", outtype="f32")


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory) -> Path:
    """A micro model with SmolLM2's kind of byte-level BPE (tokenizer.ggml.model `gpt2`), tied head, in q8_0."""
    from tests.conftest import make_tokenizer_json_dir

    folder = tmp_path_factory.mktemp("bpe-gguf")
    tokenizer = make_tokenizer_json_dir(folder / "tokenizer", "smollm2")
    micro = make_checkpoint(folder / "lit", tokenizer, tie_embeddings=True)
    return export_gguf_checkpoint(micro, folder / "model.gguf", outtype="q8_0")


def convert(path: Path, output_dir: Path, seconds: float = 20) -> str:
    """Run convert_gguf.py on `path` as a user would; check that it fails in one line naming the file, within
    `seconds`, writing nothing; return that line."""
    with within(seconds):
        code, out, err = run_command("checkpoints/convert_gguf.py", "--gguf_path", path, "--output_dir", output_dir)
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(path) in err, (code, err)
    assert not output_dir.exists() and not list(output_dir.parent.glob(f".{output_dir.name}*")), "something was written"
    return err


# ---------------------------------------------------------------------------------------------------------------
# The file's structure: the header, the metadata's counts, the tensor table's offsets and sizes
# ---------------------------------------------------------------------------------------------------------------

def header(kv_count: int, tensor_count: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def array_of_bytes(key: str, count: int, data: bytes = b"") -> bytes:
    """A metadata entry `key`: an array said to hold `count` UINT8 values, followed by `data`."""
    return gguf_string(key) + struct.pack("<IIQ", V.ARRAY, V.UINT8, count) + data


COUNTS = {
    # the gguf package's reader loops once per value of an array, reading nothing past the end of the file
    "an array of 2**62 values in a small file": (header(1) + array_of_bytes("general.languages", 2**62),
                                                  "general.languages"),
    # the values are there, but reading them one by one would take minutes
    "an array of 5 million values": (header(1) + array_of_bytes("general.languages", 5_000_000, bytes(5_000_000)),
                                     "general.languages"),
    "an array of arrays": (header(1) + gguf_string("general.languages") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1)
                           + struct.pack("<IQ", V.UINT8, 2**62), "general.languages"),
    "a string longer than the file": (header(1) + gguf_string("general.name") + struct.pack("<IQ", V.STRING, 2**40),
                                      "general.name"),
    "2**63 metadata entries": (header(2**63), "GGUF.kv_count"),
    "2**63 tensors": (header(0, tensor_count=2**63), "GGUF.tensor_count"),
}


@pytest.mark.parametrize("case", COUNTS)
def test_counts_in_the_header_and_metadata_are_checked_before_they_are_looped_over(tmp_path, case):
    content, field = COUNTS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    err = convert(path, tmp_path / "out", seconds=10)
    assert field in err, err


def patch_tensor_info(source: Path, destination: Path, name: str, offset: int = None, dims: list = None) -> Path:
    """A copy of a GGUF file whose tensor `name` has another data offset (relative to the data section, as stored)
    or other dimensions (innermost first, as stored; as many as it had)."""
    data = bytearray(source.read_bytes())
    info = next(tensor for tensor in gguf.GGUFReader(str(source)).tensors if tensor.name == name)
    end = info.field.offset + sum(int(part.nbytes) for part in info.field.parts)  # the offset is the last 8 bytes
    if dims is not None:
        assert len(dims) == len(info.shape)
        struct.pack_into(f"<{len(dims)}Q", data, end - 8 - 4 - 8 * len(dims), *dims)
    if offset is not None:
        struct.pack_into("<Q", data, end - 8, offset % 2**64)
    destination.write_bytes(bytes(data))
    return destination


def data_offset(path: Path, name: str) -> int:
    """Where tensor `name`'s data starts, relative to the data section."""
    reader = gguf.GGUFReader(str(path))
    return next(t.data_offset for t in reader.tensors if t.name == name) - reader.data_offset


TENSOR_TABLES = {
    "a tensor on another's bytes": (dict(name="blk.0.attn_k.weight", offset=("blk.0.attn_q.weight", 0)),
                                    "blk.0.attn_k.weight"),
    "an offset off the alignment": (dict(name="blk.0.attn_k.weight", offset=("blk.0.attn_k.weight", 4)),
                                    "blk.0.attn_k.weight"),
    "an offset past the end": (dict(name="output_norm.weight", offset=("output_norm.weight", 10**6)),
                               "output_norm.weight"),
    "an offset that wraps round into the header": (dict(name="blk.0.attn_norm.weight", offset=(None, -1024)),
                                                   "blk.0.attn_norm.weight"),
    "a shape larger than the file": (dict(name="blk.0.attn_norm.weight", dims=[2**62]), "blk.0.attn_norm.weight"),
    "a shape whose size overflows 64 bits": (dict(name="blk.0.attn_q.weight", dims=[2**32, 2**32]),
                                             "blk.0.attn_q.weight"),
}


@pytest.mark.parametrize("case", TENSOR_TABLES)
def test_tensor_data_must_lie_in_the_data_section_aligned_apart_and_of_its_size(tmp_path, sentencepiece_gguf, case):
    change, tensor = TENSOR_TABLES[case]
    if "offset" in change:
        relative_to, delta = change.pop("offset")
        change["offset"] = (data_offset(sentencepiece_gguf, relative_to) if relative_to else 0) + delta
    path = patch_tensor_info(sentencepiece_gguf, tmp_path / "bad.gguf", **change)
    err = convert(path, tmp_path / "out")
    assert tensor in err and "Warning" not in err, err


def test_a_tensor_of_an_unknown_name_is_named_with_the_file(tmp_path, sentencepiece_gguf):
    path = rewrite(sentencepiece_gguf, tmp_path / "bad.gguf", rename={"output_norm.weight": "blk.0.attn_qkv.weight"})
    assert "blk.0.attn_qkv.weight" in convert(path, tmp_path / "out")


def test_key_rows_that_the_head_count_does_not_divide_are_refused_before_permuting(tmp_path, sentencepiece_gguf):
    """blk.0.attn_k.weight said to have 15 rows (of the 16 stored): the per-head permutation cannot split them."""
    path = patch_tensor_info(sentencepiece_gguf, tmp_path / "bad.gguf", "blk.0.attn_k.weight", dims=[32, 15])
    err = convert(path, tmp_path / "out")
    assert "blk.0.attn_k.weight" in err and "(15, 32)" in err, err


# ---------------------------------------------------------------------------------------------------------------
# The model's metadata: types and bounds, checked before any work that grows with them
# ---------------------------------------------------------------------------------------------------------------

MODEL_METADATA = {
    # building the model to compare shapes would loop a billion times
    "a billion blocks": (dict(values={"llama.block_count": 10**9}), "llama.block_count is 1,000,000,000"),
    # the model's RoPE tables are as long as its context: 10**12 positions would not fit any machine
    "a context of 10**12": (dict(typed={"llama.context_length": (10**12, V.UINT64, None)}),
                            "llama.context_length is 1,000,000,000,000"),
    # sizes of 2**40 overflow even a model built on the meta device, which holds no memory
    "an embedding length of 2**40": (dict(typed={"llama.embedding_length": (2**40, V.UINT64, None)}),
                                     "tensor token_embd.weight"),
    "a norm epsilon in text": (dict(typed={"llama.attention.layer_norm_rms_epsilon": ("abc", V.STRING, None)}),
                               "llama.attention.layer_norm_rms_epsilon"),
    "a RoPE base as an array": (dict(typed={"llama.rope.freq_base": ([1.0, 2.0], V.ARRAY, V.FLOAT32)}),
                                "llama.rope.freq_base"),
    "a RoPE dimension in text": (dict(typed={"llama.rope.dimension_count": ("8", V.STRING, None)}),
                                 "llama.rope.dimension_count"),
    "a name that is a number": (dict(typed={"general.name": (5, V.UINT32, None)}), "general.name"),
}


@pytest.mark.parametrize("case", MODEL_METADATA)
def test_model_metadata_of_the_wrong_type_or_out_of_bounds_is_one_line(tmp_path, sentencepiece_gguf, case):
    change, expected = MODEL_METADATA[case]
    path = rewrite(sentencepiece_gguf, tmp_path / "bad.gguf", **change)
    assert expected in convert(path, tmp_path / "out", seconds=10)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer's metadata
# ---------------------------------------------------------------------------------------------------------------

def tokens_of(path: Path) -> list:
    return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents()


TOKENIZER_METADATA = {
    "tokens that are numbers": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.tokens": (list(range(len(tokens))), V.ARRAY, V.INT32)}), "tokenizer.ggml.tokens"),
    "a token twice": ("sentencepiece", lambda tokens: dict(
        values={"tokenizer.ggml.tokens": tokens[:-1] + tokens[-2:-1]}), "tokenizer.ggml.tokens"),
    "a token twice (BPE)": ("bpe", lambda tokens: dict(
        values={"tokenizer.ggml.tokens": tokens[:-1] + tokens[-2:-1]}), "tokenizer.ggml.tokens"),
    "a token that is not UTF-8": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.tokens": ([b"\xff\xfe"] + tokens[1:], V.ARRAY, V.STRING)}), "tokenizer.ggml.tokens"),
    "more tokens than the model's vocabulary": ("bpe", lambda tokens: dict(values={
        "tokenizer.ggml.tokens": tokens + ["extra"],
        "tokenizer.ggml.token_type": [1] * (len(tokens) + 1)}), "tokenizer.ggml.tokens"),
    "a merge that is not a pair": ("bpe", lambda tokens: dict(values={"tokenizer.ggml.merges": ["abc"]}),
                                   "tokenizer.ggml.merges"),
    "merges that are numbers": ("bpe", lambda tokens: dict(
        typed={"tokenizer.ggml.merges": ([1, 2], V.ARRAY, V.INT32)}), "tokenizer.ggml.merges"),
    "a merge of tokens not in the vocabulary": ("bpe", lambda tokens: dict(
        values={"tokenizer.ggml.merges": ["zzq qqz"]}), "tokenizer.ggml.merges"),
    # the tokenizers library panics (a BaseException) when what a merge makes is not a token
    "a merge that makes no token": ("bpe", lambda tokens: dict(
        values={"tokenizer.ggml.merges": [f"{tokens[-1]} {tokens[-1]}"]}), "tokenizer.ggml.merges"),
    "fewer token types than tokens": ("bpe", lambda tokens: dict(values={"tokenizer.ggml.token_type": [1] * 10}),
                                      "tokenizer.ggml.token_type"),
    "a token type of no known value": ("sentencepiece", lambda tokens: dict(
        values={"tokenizer.ggml.token_type": [99] * len(tokens)}), "tokenizer.ggml.token_type"),
    # SentencePiece reads no model without an unknown token (type 2): said of the GGUF file, not of the model
    # written from it into a temporary folder
    "no unknown token": ("sentencepiece", lambda tokens: dict(values={"tokenizer.ggml.token_type": [1] * len(tokens)}),
                         "tokenizer.ggml"),
    "token types in text": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.token_type": (["x"] * len(tokens), V.ARRAY, V.STRING)}), "tokenizer.ggml.token_type"),
    "a BOS id past the vocabulary": ("sentencepiece", lambda tokens: dict(
        values={"tokenizer.ggml.bos_token_id": 10**6}), "tokenizer.ggml.bos_token_id"),
    "a BOS id past the vocabulary (BPE)": ("bpe", lambda tokens: dict(values={
        "tokenizer.ggml.bos_token_id": 10**6, "tokenizer.ggml.add_bos_token": True}), "tokenizer.ggml.bos_token_id"),
    "a negative EOS id": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.eos_token_id": (-5, V.INT32, None)}), "tokenizer.ggml.eos_token_id"),
    "an EOS id past the vocabulary (BPE)": ("bpe", lambda tokens: dict(
        values={"tokenizer.ggml.eos_token_id": 10**6}), "tokenizer.ggml.eos_token_id"),
    "a BOS id in text": ("bpe", lambda tokens: dict(typed={"tokenizer.ggml.bos_token_id": ("1", V.STRING, None)}),
                         "tokenizer.ggml.bos_token_id"),
    "scores in text": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.scores": (["x"] * len(tokens), V.ARRAY, V.STRING)}), "tokenizer.ggml.scores"),
    "a score that is NaN": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.scores": ([float("nan")] * len(tokens), V.ARRAY, V.FLOAT32)}), "tokenizer.ggml.scores"),
    "fewer scores than tokens": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.ggml.scores": ([0.0] * 3, V.ARRAY, V.FLOAT32)}), "tokenizer.ggml.scores"),
    "a chat template that is a number": ("sentencepiece", lambda tokens: dict(
        typed={"tokenizer.chat_template": (5, V.UINT32, None)}), "tokenizer.chat_template"),
    "a chat template that is an array": ("bpe", lambda tokens: dict(
        typed={"tokenizer.chat_template": (["{{ x }}"], V.ARRAY, V.STRING)}), "tokenizer.chat_template"),
    "a pre-tokenizer name that is a number": ("bpe", lambda tokens: dict(
        typed={"tokenizer.ggml.pre": (5, V.UINT32, None)}), "tokenizer.ggml.pre"),
    "add_bos_token in text": ("bpe", lambda tokens: dict(
        typed={"tokenizer.ggml.add_bos_token": ("yes", V.STRING, None)}), "tokenizer.ggml.add_bos_token"),
}


@pytest.mark.parametrize("case", TOKENIZER_METADATA)
def test_tokenizer_metadata_that_makes_no_tokenizer_is_one_line_naming_the_key(tmp_path, request, case):
    kind, change, key = TOKENIZER_METADATA[case]
    source = request.getfixturevalue(f"{kind}_gguf" if kind == "bpe" else "sentencepiece_gguf")
    path = rewrite(source, tmp_path / "bad.gguf", **change(tokens_of(source)))
    err = convert(path, tmp_path / "out")
    assert key in err and tempfile.gettempdir() not in err.replace(str(tmp_path), ""), err  # never a temporary file


# ---------------------------------------------------------------------------------------------------------------
# Optional packages: the gguf extra names itself
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, missing", [("bpe", ["tokenizers"]), ("sentencepiece", ["google.protobuf"])])
def test_a_missing_package_names_the_gguf_extra(tmp_path, request, monkeypatch, kind, missing):
    """The tokenizers library (a byte-level BPE's tokenizer.json), protobuf (a SentencePiece tokenizer.model)."""
    source = request.getfixturevalue("bpe_gguf" if kind == "bpe" else "sentencepiece_gguf")
    for module in list(sys.modules):  # imported again, so that the import fails
        if module.startswith(("tokenizers", "google", "sentencepiece.sentencepiece_model_pb2")):
            monkeypatch.delitem(sys.modules, module)
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)
    err = convert(source, tmp_path / "out")
    assert 'pip install -e ".[gguf]"' in err and missing[0].split(".")[-1] in err, err


# ---------------------------------------------------------------------------------------------------------------
# Exporting onto the checkpoint's own files
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["lit_model.pth", "tokenizer.model", "the checkpoint folder", "inside lit_model.pth",
                                    "the LoRA file"])
def test_export_onto_its_own_input_is_refused_before_anything_is_written(tmp_path, tokenizer_path, target):
    from lit_lora.checkpoint import load_model
    from lit_lora.lora import apply_lora
    from lit_lora.method_files import save_lora

    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    save_lora(apply_lora(load_model(micro), r=2, alpha=4), tmp_path / "lora.pth")
    output = {"the checkpoint folder": micro, "inside lit_model.pth": micro / "lit_model.pth" / "model.gguf",
              "the LoRA file": tmp_path / "lora.pth"}.get(target, micro / target)
    before = {path: path.read_bytes() for path in [*micro.iterdir(), tmp_path / "lora.pth"]}
    code, out, err = run_command("checkpoints/export_gguf.py", "--checkpoint_dir", micro, "--lora_path",
                                 tmp_path / "lora.pth", "--output_path", output)
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(output) in err, err
    assert "Wrote" not in out
    assert {path: path.read_bytes() for path in [*micro.iterdir(), tmp_path / "lora.pth"]} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lit", "lora.pth"]


def test_export_onto_an_existing_folder_is_one_line_before_the_export_runs(tmp_path, tokenizer_path, monkeypatch):
    import lit_lora.convert.gguf as gguf_module

    micro = make_checkpoint(tmp_path / "lit", tokenizer_path)
    (tmp_path / "exports").mkdir()
    monkeypatch.setattr(gguf_module, "load_model", lambda *args, **kwargs: pytest.fail("the export ran"))
    code, out, err = run_command("checkpoints/export_gguf.py", "--checkpoint_dir", micro, "--output_path",
                                 tmp_path / "exports")
    assert code == 1 and len(err.strip().splitlines()) == 1 and f"{tmp_path / 'exports'} is a folder" in err, err
    assert list((tmp_path / "exports").iterdir()) == []
