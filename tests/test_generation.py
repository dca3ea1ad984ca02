import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_lora.chat import check_prompt_length
from lit_lora.generation import generate, sample, stream_text
from lit_lora.model import Config, LLaMA


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LLaMA(Config.from_name("micro")).eval()


def greedy_by_recomputation(model, prompt, n):
    """The slow reference: run the whole sequence again for every new token, no cache."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            next_token = model(seq.unsqueeze(0))[0, -1].argmax()
            seq = torch.cat([seq, next_token.view(1)])
    return seq[len(prompt):]


def test_greedy_with_kv_cache_equals_full_recomputation(model):
    prompt = torch.randint(0, 256, (7,))
    (tokens,) = generate(model, [prompt], max_new_tokens=30, temperature=0.0)
    assert tokens.shape == (30,)
    assert torch.equal(tokens, greedy_by_recomputation(model, prompt, 30))


def test_top_k_1_equals_greedy(model):
    prompt = torch.randint(0, 256, (5,))
    (greedy,) = generate(model, [prompt], max_new_tokens=20, temperature=0.0)
    (top1,) = generate(model, [prompt], max_new_tokens=20, temperature=1.5, top_k=1, seed=3)
    assert torch.equal(greedy, top1)


def test_seed_makes_sampling_reproducible(model):
    prompt = torch.randint(0, 256, (5,))
    a = generate(model, [prompt], max_new_tokens=25, temperature=2.0, seed=42)[0]
    b = generate(model, [prompt], max_new_tokens=25, temperature=2.0, seed=42)[0]
    c = generate(model, [prompt], max_new_tokens=25, temperature=2.0, seed=43)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 11, 6)]
    batched = generate(model, prompts, max_new_tokens=15, temperature=0.0)
    for prompt, tokens in zip(prompts, batched):
        (alone,) = generate(model, [prompt], max_new_tokens=15, temperature=0.0)
        assert torch.equal(tokens, alone)


def test_stops_at_eos(model):
    prompt = torch.randint(0, 256, (4,))
    (free,) = generate(model, [prompt], max_new_tokens=12, temperature=0.0)
    eos_id = int(free[5])
    first = int((free == eos_id).nonzero()[0])  # the first time greedy decoding produces that token
    (stopped,) = generate(model, [prompt], max_new_tokens=12, temperature=0.0, stop_ids=[eos_id])
    assert torch.equal(stopped, free[:first])


def model_preferring(token_id: int, vocab_size: int = 320) -> LLaMA:
    """A micro model whose logits favour `token_id` by far: greedy decoding picks it at every step."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro", vocab_size=vocab_size)).eval()
    bias = torch.zeros(model.config.padded_vocab_size)
    bias[token_id] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model


def test_stops_at_the_second_of_several_stop_ids():
    from lit_lora.generation import generate_stream

    model, prompt = model_preferring(7), torch.randint(0, 256, (4,))
    (free,) = generate(model, [prompt], max_new_tokens=6, temperature=0.0, stop_ids=[5])
    assert free.tolist() == [7] * 6  # 7 is not a stop id: it runs to max_new_tokens
    (stopped,) = generate(model, [prompt], max_new_tokens=6, temperature=0.0, stop_ids=(5, 7))
    assert stopped.shape == (0,)  # cut before the stop id
    model.set_kv_cache(batch_size=1, max_seq_length=10)
    steps = list(generate_stream(model, [prompt], max_new_tokens=6, temperature=0.0, stop_ids={5, 7}))
    model.clear_kv_cache()
    assert [int(t) for t in steps] == [7]  # the stream ends once every row has stopped
    with pytest.raises(TypeError, match=re.escape("stop_ids 7: a collection of ids, e.g. tokenizer.stop_ids or [7]")):
        generate(model, [prompt], max_new_tokens=6, stop_ids=7)


def test_each_row_stops_at_its_own_stop_id_and_repeats_it(model):
    from lit_lora.generation import generate_stream

    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 9)]
    free = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    first = {row: int(free[row][n]) for row, n in ((0, 2), (1, 6))}  # row 0 stops at its 3rd token, row 1 later
    stop_ids = [first[0], first[1]]
    ends = [int(torch.isin(f, torch.tensor(stop_ids)).nonzero()[0]) for f in free]
    assert ends[0] < ends[1] and int(free[0][ends[0]]) != int(free[1][ends[1]])  # at other steps, by other ids
    stopped = generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_ids=stop_ids)
    assert [s.tolist() for s in stopped] == [f[:end].tolist() for f, end in zip(free, ends)]
    model.set_kv_cache(batch_size=2, max_seq_length=9 + 12)
    steps = torch.stack(list(generate_stream(model, prompts, 12, temperature=0.0, stop_ids=stop_ids)), dim=1)
    model.clear_kv_cache()
    for row, end in enumerate(ends):  # after its stop id a row yields that id again while the other goes on
        assert (steps[row, end:] == free[row][end]).all() and int(free[row][end]) in stop_ids
    assert steps.shape[1] == max(ends) + 1


def test_generation_stops_at_every_stop_id_of_a_tokenizer_json(llama3_tokenizer_dir, capsys):
    from lit_lora.chat import generate_and_print
    from lit_lora.tokenizer import Tokenizer

    tokenizer = Tokenizer(llama3_tokenizer_dir)
    end_of_text = tokenizer.json_tokenizer.token_to_id("<|end_of_text|>")
    assert tokenizer.stop_ids[1] == end_of_text != tokenizer.eos_id  # Instruct: EOS is <|eot_id|>
    model = model_preferring(end_of_text, vocab_size=tokenizer.vocab_size)
    assert generate_and_print(model, tokenizer, "Hello", max_new_tokens=8, temperature=0.0) == [""]
    assert "Sample 1: 1 tokens in" in capsys.readouterr().err
    ids = tokenizer.encode("Hello world", bos=False).tolist() + [end_of_text] + tokenizer.encode(" more").tolist()
    assert "".join(stream_text(tokenizer, iter(torch.tensor(ids)))) == "Hello world"


def test_prompt_style_formats_the_prompt_and_stops_at_its_end_of_answer(tmp_path, monkeypatch, capsys):
    from lit_lora import chat
    from lit_lora.chat import GenerateArgs, run_generation
    from lit_lora.prompts import format_prompt
    from lit_lora.tokenizer import Tokenizer
    from tests.conftest import make_tokenizer_json_dir

    folder = make_tokenizer_json_dir(tmp_path / "llama3-base", "llama3", instruct=False)
    tokenizer = Tokenizer(folder)
    eot = tokenizer.json_tokenizer.token_to_id("<|eot_id|>")
    assert eot not in tokenizer.stop_ids  # Llama 3 base stops only at <|end_of_text|>
    model, prompts, real_stream = model_preferring(eot, vocab_size=tokenizer.vocab_size), [], chat.generate_stream

    def spy(model, prompt_list, *args, **kwargs):
        prompts.append(prompt_list[0].tolist())
        return real_stream(model, prompt_list, *args, **kwargs)

    monkeypatch.setattr(chat, "generate_stream", spy)  # what generate_and_print calls
    options = dict(prompt="Say hi.", checkpoint_dir=folder, max_new_tokens=6, temperature=0.0, precision="32-true")
    assert run_generation(model, GenerateArgs(**options, prompt_style="llama3")) == [""]  # stopped at <|eot_id|>
    assert prompts[-1] == tokenizer.encode(format_prompt("Say hi.", style="llama3"), bos=True).tolist()
    assert "Sample 1: 1 tokens in" in capsys.readouterr().err
    run_generation(model, GenerateArgs(**options))  # no style: the prompt as it is, and <|eot_id|> does not stop it
    assert prompts[-1] == tokenizer.encode("Say hi.", bos=True).tolist()
    assert "Sample 1: 6 tokens in" in capsys.readouterr().err


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, top_p=0.7, generator=generator) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = torch.stack([sample(logits, 1.0, top_p=0.5, generator=generator) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}
    draws = torch.stack([sample(logits, 1.0, top_k=3, generator=generator) for _ in range(1000)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_stream_text_equals_decoding_everything(tokenizer):
    text = "The model learns 42 things: Zürich ✓ 東京"
    ids = tokenizer.encode(text, bos=False, eos=True)
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert "".join(pieces) == text
    assert len(pieces) > 5  # it streamed, piece by piece
    assert not any("\ufffd" in piece for piece in pieces)


def test_prompt_longer_than_the_context(model, capsys):
    with pytest.raises(ValueError, match="context is 64"):
        check_prompt_length(model, 64, 10)
    assert check_prompt_length(model, 60, 10) == 4
    assert "generating at most 4 tokens" in capsys.readouterr().err
    assert check_prompt_length(model, 10, 10) == 10


def test_generate_base_script(checkpoint_dir, capsys):
    from generate.base import main
    from lit_lora.chat import GenerateArgs

    main(GenerateArgs(prompt="The model", checkpoint_dir=checkpoint_dir, max_new_tokens=8, num_samples=2, seed=1))
    out, err = capsys.readouterr()
    assert out.count("The model") == 2
    assert "Sample 2: " in err and "tokens/s" in err and "peak memory" in err
    with pytest.raises(FileNotFoundError, match="convert_hf.py"):
        main(GenerateArgs(checkpoint_dir=checkpoint_dir.parent / "missing"))


def test_interactive_loop_streams_answers_until_an_empty_line(tmp_path, tokenizer_path, monkeypatch, capsys):
    from generate.full import FullGenerateArgs, main
    from tests.conftest import make_checkpoint

    checkpoint_dir = make_checkpoint(tmp_path / "model", tokenizer_path, block_size=256)  # room for the template
    answers = iter(["Say hello.", "Name a colour.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    main(FullGenerateArgs(checkpoint_dir=checkpoint_dir, interactive=True, max_new_tokens=4, temperature=0.0))
    err = capsys.readouterr().err
    assert err.count("Sample 1: ") == 2  # two instructions answered, then the empty line ends the loop


@pytest.mark.parametrize("options, words", [
    (dict(temperature=-0.5), "temperature -0.5: must be >= 0"),
    (dict(temperature=float("nan")), "temperature nan: must be >= 0"),
    (dict(top_k=0), "top_k 0: must be at least 1"),
    (dict(top_k=-3), "top_k -3: must be at least 1"),
    (dict(top_p=0.0), "top_p 0.0: must be in (0, 1]"),
    (dict(top_p=-0.1), "top_p -0.1: must be in (0, 1]"),
    (dict(top_p=1.5), "top_p 1.5: must be in (0, 1]"),
])
def test_sampling_refuses_settings_that_mean_nothing(options, words):
    """Checked once per call of generate (not per token, in sample), before anything is computed."""
    settings = dict(temperature=1.0, top_k=None, top_p=1.0) | options
    model = LLaMA(Config.from_name("micro")).eval()
    with pytest.raises(ValueError, match=re.escape(words)):
        generate(model, [torch.tensor([1, 2])], max_new_tokens=2, **settings)


def test_top_k_keeps_exactly_k_tokens_even_when_tied():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])  # three tokens tied for the best
    generator = torch.Generator().manual_seed(0)
    top1 = {int(sample(logits, 1.0, top_k=1, generator=generator)) for _ in range(200)}
    top2 = {int(sample(logits, 1.0, top_k=2, generator=generator)) for _ in range(400)}
    assert len(top1) == 1 and top1 <= {1, 2, 3}
    assert len(top2) == 2 and top2 <= {1, 2, 3}


def test_a_tiny_top_p_keeps_only_the_most_likely_token(model):
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0]])  # a tie: the first of the two, as argmax
    generator = torch.Generator().manual_seed(0)
    assert {int(sample(logits, 1.0, top_p=1e-9, generator=generator)) for _ in range(100)} == {1}
    prompt = torch.randint(0, 256, (5,))
    (greedy,) = generate(model, [prompt], max_new_tokens=20, temperature=0.0)
    (tiny_top_p,) = generate(model, [prompt], max_new_tokens=20, temperature=1.5, top_p=1e-9, seed=3)
    assert torch.equal(greedy, tiny_top_p)


def model_preferring_ids_past(vocab_size: int, extra: int = 40) -> LLaMA:
    """A model whose config has `extra` more ids than the tokenizer (a padded vocabulary) and whose logits
    favour those extra ids by far: unrestricted, every step would pick one the tokenizer cannot decode."""
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("micro", vocab_size=vocab_size + extra, block_size=256)).eval()
    bias = torch.zeros(model.config.padded_vocab_size)
    bias[vocab_size: vocab_size + extra] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model


def test_never_samples_an_id_the_tokenizer_does_not_have(tokenizer, tokenizer_path, capsys):
    from lit_lora.chat import GenerateArgs, run_generation

    model = model_preferring_ids_past(tokenizer.vocab_size)
    prompt = tokenizer.encode("The model", bos=True)
    (free,) = generate(model, [prompt], max_new_tokens=5, temperature=0.0)
    assert (free >= tokenizer.vocab_size).all()  # what the model prefers when nothing stops it
    for options in (dict(temperature=0.0), dict(temperature=1.0, top_k=None, seed=0)):
        (tokens,) = generate(model, [prompt], max_new_tokens=20, vocab_size=tokenizer.vocab_size, **options)
        assert len(tokens) == 20 and (tokens < tokenizer.vocab_size).all()

    # the scripts' path decodes what it samples: it must not crash in Tokenizer.decode
    texts = run_generation(model, GenerateArgs(prompt="The model", checkpoint_dir=tokenizer_path, max_new_tokens=10,
                                    num_samples=2, precision="32-true"))
    assert len(texts) == 2 and all(texts)
    assert capsys.readouterr().err.count("10 tokens in") == 2


def test_generation_runs_without_autograd_and_without_inference_tensors(model):
    """no_grad, not inference_mode: a model sharded by FSDP (the training loop's evaluation) cannot
    run on inference tensors, and what generation returns must stay usable by ordinary code."""
    seen = []
    hook = model.register_forward_hook(
        lambda module, inputs, output: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                                   output.is_inference())))
    try:
        (tokens,) = generate(model, [torch.randint(0, 256, (5,))], max_new_tokens=4, temperature=0.0)
    finally:
        hook.remove()
    assert seen == [(False, False, False)] * 4  # the prefill and 3 decoding steps
    assert not tokens.is_inference()


BAD_FLAGS = [  # (flag, value, what the error must say after "--flag value: ")
    ("max_new_tokens", 0, "must be at least 1"),
    ("max_new_tokens", -5, "must be at least 1"),
    ("temperature", -0.1, "must be >= 0"),
    ("top_k", 0, "must be at least 1 (1: greedy decoding), or null"),
    ("top_p", 0.0, "must be in (0, 1]"),
    ("top_p", 1.01, "must be in (0, 1]"),
    ("num_samples", 0, "must be at least 1"),
    ("seed", -1, "must be from 0 to 2**63 - 1, or null"),
    ("prompt_style", "vicuna", "is not a prompt style; choose one of alpaca, llama3, chatml"),
    ("quantize", "nf4", "is not a quantization mode; choose bnb.nf4 (4-bit NormalFloat) or bnb.nf4-dq"),
]


@pytest.mark.parametrize("flag, value, words", BAD_FLAGS)
def test_generate_flags_are_checked_while_parsing(flag, value, words):
    from generate.adapter import AdapterGenerateArgs
    from generate.full import FullGenerateArgs
    from generate.lora import LoRAGenerateArgs
    from lit_lora.chat import GenerateArgs

    for flags in (GenerateArgs, LoRAGenerateArgs, AdapterGenerateArgs, FullGenerateArgs):
        with pytest.raises(ValueError) as error:
            flags(**{flag: value})
        assert str(error.value).startswith(f"--{flag} {value}: {words}")


def test_a_bad_flag_stops_the_script_with_one_line_and_exit_code_2(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))  # this checkout's lit_lora, whatever is installed
    env.pop("LIT_LORA_TRACEBACK", None)
    result = subprocess.run([sys.executable, "generate/base.py", "--max_new_tokens", "-5",
                             "--checkpoint_dir", str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: --max_new_tokens -5: must be at least 1\n"  # the flag is refused before the folder is read
    assert result.stdout == ""


def test_a_prompt_that_is_not_utf8_is_refused_while_parsing(tmp_path):
    from generate.lora import LoRAGenerateArgs
    from lit_lora.chat import GenerateArgs

    with pytest.raises(ValueError, match=re.escape("--prompt is not valid UTF-8: character 4 (after 'Caf') is the byte 0xE9")):
        GenerateArgs(prompt="Caf\udce9")
    with pytest.raises(ValueError, match=re.escape("--input is not valid UTF-8: character 1 (at the start) is the byte 0xFF")):
        LoRAGenerateArgs(input="\udcff")

    # on the command line: the bytes as a Latin-1 terminal sends them
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("LIT_LORA_TRACEBACK", None)
    result = subprocess.run([sys.executable, "generate/base.py", "--checkpoint_dir", str(tmp_path), "--prompt", b"Caf\xe9"],
                            capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --prompt is not valid UTF-8: character 4 (after 'Caf') is the byte 0xE9")
    assert result.stderr.count("\n") == 1  # one line, no traceback


def typed(lines: list):
    """A stand-in for input(): returns the lines one by one, raising those that are exceptions."""
    lines = iter(lines)

    def fake_input(prompt: str = "") -> str:
        line = next(lines)
        if isinstance(line, BaseException):
            raise line
        return line

    return fake_input


def test_interactive_lines_that_are_not_utf8_get_an_error_and_the_session_goes_on(tmp_path, tokenizer_path,
                                                                                    monkeypatch, capsys):
    from generate.full import FullGenerateArgs, main
    from tests.conftest import make_checkpoint

    checkpoint_dir = make_checkpoint(tmp_path / "model", tokenizer_path, block_size=256)

    monkeypatch.setattr("builtins.input", typed([
        "Caf\udce9",  # from a terminal in surrogateescape mode (C/POSIX locale)
        UnicodeDecodeError("utf-8", b"Caf\xe9 noir", 3, 4, "invalid continuation byte"),  # from a strict one
        "Say hello.",
        "",
    ]))
    main(FullGenerateArgs(checkpoint_dir=checkpoint_dir, interactive=True, max_new_tokens=4, temperature=0.0))
    err = capsys.readouterr().err
    assert err.count("error: This line is not valid UTF-8: character 4 (after 'Caf') is the byte 0xE9") == 2
    assert err.count("Sample 1: ") == 1  # the good line was answered


@pytest.mark.parametrize("quit_key", [KeyboardInterrupt(), EOFError()], ids=["ctrl-c", "ctrl-d"])
def test_interactive_ctrl_c_or_a_too_long_prompt_ends_only_that_answer(quit_key, tmp_path, tokenizer_path,
                                                                       monkeypatch, capsys):
    from generate.full import FullGenerateArgs, main
    from lit_lora import chat
    from tests.conftest import make_checkpoint

    checkpoint_dir = make_checkpoint(tmp_path / "model", tokenizer_path, block_size=256)
    models, real_stream = [], chat.generate_stream

    def interrupted_once(model, *args, **kwargs):
        """The first answer is interrupted by Ctrl-C after two tokens; the others run as they are."""
        models.append(model)
        for n, token in enumerate(real_stream(model, *args, **kwargs)):
            if len(models) == 1 and n == 2:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(chat, "generate_stream", interrupted_once)
    monkeypatch.setattr("builtins.input", typed(["Say hello.", "word " * 300, "Name a colour.", quit_key]))
    try:
        main(FullGenerateArgs(checkpoint_dir=checkpoint_dir, interactive=True, max_new_tokens=4, temperature=0.0))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during an answer ended the whole session")
    err = capsys.readouterr().err
    assert "Answer stopped (Ctrl-C)" in err
    assert "error: The prompt is " in err and "the model's context is 256: shorten the prompt" in err
    assert err.count("Sample 1: 4 tokens") == 1  # the third line was answered in full
    assert len(models) == 2 and models[0].blocks[0].attn.kv_cache is None  # the interrupted answer freed its cache


@pytest.mark.parametrize("script", ["generate/base.py", "generate/lora.py", "generate/adapter.py", "generate/full.py"])
def test_help_says_null_which_is_what_the_parser_accepts(script):
    import runpy

    from jsonargparse import capture_parser

    root = Path(__file__).resolve().parents[1]
    parser = capture_parser(runpy.run_path, str(root / script), run_name="__main__")
    help_text = " ".join(parser.format_help().split())  # unwrapped
    assert "most likely tokens (null: all)" in help_text
    assert "(null: different every run)" in help_text
    assert "(None:" not in help_text
    flags = parser.parse_args(["--top_k", "null", "--seed", "null"])
    assert flags.top_k is None and flags.seed is None


def test_generate_refuses_a_negative_number_of_new_tokens(model):
    prompt = torch.randint(0, 256, (8,))
    with pytest.raises(ValueError, match=re.escape("max_new_tokens -5: must be >= 0")):
        generate(model, [prompt], max_new_tokens=-5)  # was an IndexError inside the KV cache
    assert model.blocks[0].attn.kv_cache is None
    assert generate(model, [prompt], max_new_tokens=0)[0].shape == (0,)


@pytest.mark.parametrize("temperature", [1e-9, 1e-39, 1e-300, 5e-324])
def test_a_vanishing_temperature_samples_the_most_likely_token(temperature):
    """logits / temperature overflows float32 below ~1e-37: such a temperature still means "the most likely token",
    never "probability tensor contains inf or nan"."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 10
    for seed in range(3):
        picked = sample(logits, temperature=temperature, top_k=50, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))
        assert torch.equal(picked, logits.argmax(dim=-1))
