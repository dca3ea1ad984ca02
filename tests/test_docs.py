"""The guides stay true to the code.

1. Every `python` command shown in a ```bash block of README.md and howto/*.md names a script that exists
   and passes only flags that the script's own jsonargparse parser accepts, with values of the right type.
   The parser is captured without running the script's main: `capture_parser` executes the script as
   `__main__` and stops it at the start of `parse_args`, so each flag is parsed exactly as on the command line.
2. Every relative link in those files points at a file that exists (and, for `#L12` anchors, a line it has).
3. The links of howto/lora_explained.md into lit_lora/lora.py point at lines holding what the text says
   they hold (LORA_LINE_CLAIMS below): when lora.py changes, this test says which links to renumber.
"""

import functools
import re
import runpy
import shlex
from pathlib import Path
from typing import Optional

import pytest
from jsonargparse import capture_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "howto").glob("*.md"))]
SHELL_OPERATORS = {"&&", "||", ";", "|"}


# ---------------------------------------------------------------------------------------------------------
# Commands


def bash_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every `python ...` command in the ```bash blocks of a markdown text.

    Lines ending in a backslash are joined with the next; a line chaining commands with && ; | is split and
    each part starting with `python` is a command. `python -m ...` (modules such as pytest) is left out."""
    commands, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped == "```bash"
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full, pending = pending + stripped, ""
        tokens = shlex.split(full, comments=True)
        part: list[str] = []
        for token in tokens + [";"]:
            if token not in SHELL_OPERATORS:
                part.append(token)
                continue
            if len(part) >= 2 and part[0] == "python" and part[1] != "-m":
                commands.append((start, shlex.join(part)))
            part = []
    return commands


@functools.cache
def script_parser(script: str):
    """The jsonargparse parser a script builds for its command line, captured before it parses anything."""
    parser = capture_parser(runpy.run_path, str(ROOT / script), run_name="__main__")
    parser.exit_on_error = False  # raise ArgumentError instead of printing and exiting
    return parser


def check_command(command: str) -> Optional[str]:
    """None if the command's script exists and its parser accepts every flag; else what is wrong."""
    _, script, *flags = shlex.split(command)
    if not script.endswith(".py") or not (ROOT / script).is_file():
        return f"no script {script} in the repository"
    flags = [f for f in flags if f not in ("--help", "-h")]  # --help would print and exit
    try:
        script_parser(script).parse_args(flags)
    except Exception as e:  # ArgumentError, or a type the value does not fit
        return f"{script} rejects {' '.join(flags)!r}: {str(e).strip().splitlines()[0]}"
    return None


DOC_COMMANDS = [(doc, line, command) for doc in DOCS for line, command in bash_commands(doc.read_text())]


def test_commands_found():
    # the guides the tests rely on exist and show commands; a broken extractor would find none
    names = {doc.name for doc, _, _ in DOC_COMMANDS}
    for guide in ("README.md", "prepare_dataset.md", "finetune_lora.md", "finetune_adapter.md", "finetune_full.md",
                  "generate.md"):
        assert guide in names, f"no python command found in {guide}"
    assert len(DOC_COMMANDS) > 40


@pytest.mark.parametrize("doc,line,command", DOC_COMMANDS,
                         ids=[f"{doc.name}:{line}" for doc, line, _ in DOC_COMMANDS])
def test_doc_command_parses(doc, line, command):
    error = check_command(command)
    assert error is None, f"{doc.relative_to(ROOT)}, line {line}: {command}\n  {error}"


def test_extractor_and_checker_reject_what_is_wrong():
    markdown = "\n".join([
        "```bash",
        "python finetune/lora.py --data_dir data/alpaca \\",
        "    --lora_targets [q,k,v,o]   # a comment",
        "pip install foo && python prepare_data/alpaca.py --test_split_size 0.1",
        "python -m pytest -q tests",
        "```",
        "```",
        "python not/in/a/bash/block.py",
        "```",
    ])
    assert bash_commands(markdown) == [
        (2, "python finetune/lora.py --data_dir data/alpaca --lora_targets '[q,k,v,o]'"),
        (4, "python prepare_data/alpaca.py --test_split_size 0.1"),
    ]
    assert check_command("python finetune/lora.py --data_dir data/alpaca --lora_targets [q,k,v,o]") is None
    assert check_command("python prepare_data/alpaca.py --test_split_size 0.1") is None
    assert "--lora_rank" in check_command("python finetune/lora.py --lora_rank 8")  # a made-up flag
    assert check_command("python finetune/lora.py --lora_targets q,v") is not None  # not a list
    assert check_command("python finetune/lora.py --learning_rate fast") is not None  # not a float
    assert check_command("python generate/lora.py --precision bf16-mixed") is not None  # not a choice here
    assert check_command("python prepare_data/alpaca.py --test_split_fraction 0.1") is not None  # no such flag
    assert "no script" in check_command("python finetune/qlora.py --lora_r 8")


# ---------------------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
LINE_ANCHOR = re.compile(r"^L(\d+)(?:-L(\d+))?$")


def relative_links(doc: Path) -> list[tuple[str, Path, str]]:
    """(link as written, target file, fragment) of every link in `doc` that is not a web address."""
    links = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, fragment = target.partition("#")
        links.append((target, (doc.parent / path).resolve(), fragment))
    return links


def test_relative_links_point_at_files_and_lines():
    broken = []
    for doc in DOCS:
        for target, path, fragment in relative_links(doc):
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
                continue
            anchor = LINE_ANCHOR.match(fragment)
            if anchor:
                n_lines = len(path.read_text().splitlines())
                last = int(anchor.group(2) or anchor.group(1))
                if not 1 <= int(anchor.group(1)) <= last <= n_lines:
                    broken.append(f"{doc.name}: {target} ({path.name} has {n_lines} lines)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# Every link of howto/lora_explained.md into lit_lora/lora.py, and text that the line (or one of the lines of
# a range) must contain. A link missing here fails, so each new link comes with its claim.
LORA_LINE_CLAIMS = {
    "L7": "h = W0 x + (alpha / r) * B A x",
    "L41": "class LoRALinear(nn.Linear)",
    "L48": "self.weight.requires_grad = False",
    "L49": "self.lora_A = nn.Parameter(torch.empty(r, in_features",
    "L50": "self.lora_B = nn.Parameter(torch.empty(out_features, r",
    "L51": "nn.Dropout(dropout)",
    "L52": "self.scaling = r, alpha, alpha / r",
    "L57": "nn.init.kaiming_uniform_(self.lora_A",
    "L58": "nn.init.zeros_(self.lora_B)",
    "L67": "lora.weight = nn.Parameter(w.data, requires_grad=False)",
    "L74": "return (self.lora_B @ self.lora_A) * self.scaling",
    "L82": "@ self.lora_A.T) * self.scaling) @ self.lora_B.T",
    "L85-L90": "self.weight.data += self.delta_weight()",
    "L93-L96": "self.weight.data -= self.delta_weight()",
    "L34-L38": '"q": "attn.q_proj"',
    "L131-L140": "setattr(parent, name, LoRALinear.from_linear(",
    "L147-L149": 'param.requires_grad = "lora_" in name',
    "L170-L180": '"lora_config": asdict(model.lora_config)',
}


def test_lora_explained_links_point_at_what_they_claim():
    doc = ROOT / "howto" / "lora_explained.md"
    lora_py = ROOT / "lit_lora" / "lora.py"
    lines = lora_py.read_text().splitlines()
    anchors = {fragment for _, path, fragment in relative_links(doc) if path == lora_py and fragment}
    assert anchors, "howto/lora_explained.md links to no line of lit_lora/lora.py"
    assert not anchors - set(LORA_LINE_CLAIMS), f"links without a claim in LORA_LINE_CLAIMS: {anchors - set(LORA_LINE_CLAIMS)}"
    assert not set(LORA_LINE_CLAIMS) - anchors, f"claims no link uses: {set(LORA_LINE_CLAIMS) - anchors}"
    wrong = []
    for anchor, text in LORA_LINE_CLAIMS.items():
        first, last = LINE_ANCHOR.match(anchor).groups()
        span = lines[int(first) - 1: int(last or first)]
        if not any(text in line for line in span):
            wrong.append(f"#{anchor} should hold {text!r}, holds {span}")
    assert not wrong, "lit_lora/lora.py changed; renumber these links in howto/lora_explained.md:\n" + "\n".join(wrong)
