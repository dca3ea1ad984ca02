"""The guides stay true to the code.

1. Every `python` command shown in a ```bash block of README.md and howto/*.md names a script that exists
   and passes only flags that the script's own jsonargparse parser accepts, with values of the right type.
   The parser is captured without running the script's main: `capture_parser` executes the script as
   `__main__` and stops it at the start of `parse_args`, so each flag is parsed exactly as on the command line.
2. Every relative link in those files points at a file that exists (and, for `#L12` anchors, a line it has).
3. howto/lora_explained.md cites lit_lora/lora.py by names that lora.py defines and by quotes of its code
   that lora.py holds word for word, whole lines or starts of lines marked "..." (LORA_QUOTES below), never by
   line number.
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


# The code that howto/lora_explained.md quotes from lit_lora/lora.py (in backticks). Each must be a whole line of
# lora.py (its code, without a trailing comment), or the start of one followed by "..." in the guide: nothing of a
# line is left out unmarked. Every quote of code in the guide (a backticked span with "self.") must be listed
# here, so the guide cannot drift from the code.
LORA_QUOTES = [
    "self.weight = linear.weight",
    "self.weight.requires_grad = False",
    "self.lora_A = nn.Parameter(torch.empty(r, self.in_features",
    "self.lora_B = nn.Parameter(torch.empty(self.out_features, r",
    "return h + ((self.lora_dropout(x) @ self.lora_A.T) * self.scaling) @ self.lora_B.T",
    "setattr(parent, name, lora_class(linear, r, alpha, dropout))",
    "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))",
    "nn.init.zeros_(self.lora_B)",
    "self.r, self.alpha, self.scaling = r, alpha, alpha / r",
    "self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
    'param.requires_grad = "lora_" in name',
    "return (self.lora_B.float() @ self.lora_A.float()) * self.scaling",
    "self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))",
    "self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))",
    "h = W0 x + (alpha / r) * B A x",
]


def code_lines(code: str) -> list[str]:
    """Each line of `code`, stripped of its indentation and of a trailing comment."""
    return [re.sub(r"\s+#.*$", "", line).strip() for line in code.splitlines()]


def test_lora_explained_cites_lora_py_by_name_and_quotes_it_word_for_word():
    """howto/lora_explained.md points into lit_lora/lora.py by names (functions, classes, methods) and quoted
    code, never by line number, so editing lora.py never means renumbering the guide."""
    doc = (ROOT / "howto" / "lora_explained.md").read_text()
    code = (ROOT / "lit_lora" / "lora.py").read_text()
    links = re.findall(r"\[`([\w.]+)`\]\(\.\./lit_lora/lora\.py(#[^)]*)?\)", doc)
    assert len(links) >= 8, "the guide names the parts of lora.py it explains"
    assert not [name for name, anchor in links if anchor], "link lora.py by name, not by line number"
    for name, _ in links:
        owner, _, member = name.rpartition(".")
        assert re.search(rf"^\s*(def|class) {member}\b|^{member} = ", code, re.M), f"lora.py defines no {name}"
        if owner:
            body = code[code.index(f"class {owner}("):]
            assert re.search(rf"^    def {member}\b", body, re.M), f"{owner} has no method {member}"
    spans = re.findall(r"`([^`\n]+)`", doc)
    lines = code_lines(code)
    whole = [q for q in LORA_QUOTES if q in lines]
    started = [q for q in LORA_QUOTES if f"`{q}`..." in doc and any(line.startswith(q) for line in lines)]
    missing_in_code = [q for q in LORA_QUOTES if q not in whole and q not in started]
    missing_in_doc = [q for q in LORA_QUOTES if q not in spans and "    " + q not in doc]
    unlisted = [span for span in spans if "self." in span and span not in LORA_QUOTES]
    assert not missing_in_code, ("each quote must be a whole line of lit_lora/lora.py, or the start of one followed "
                                 f"by ... in howto/lora_explained.md; update these: {missing_in_code}")
    assert not missing_in_doc, f"quotes the guide no longer shows: {missing_in_doc}"
    assert not unlisted, f"code quoted in the guide but not checked (add it to LORA_QUOTES): {unlisted}"


def test_the_readmes_reading_order_gives_the_files_true_line_counts():
    """README's course table names each file with its length: they must be today's, so a reader can plan."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| \d \| \[`(lit_lora/[\w/]+\.py)`\]\([^)]*\) \| (\d+) \|", readme, re.M)
    assert [path for path, _ in rows] == ["lit_lora/model.py", "lit_lora/lora.py", "lit_lora/train.py",
                                          "lit_lora/generation.py"]
    for path, lines in rows:
        assert int(lines) == len((ROOT / path).read_text().splitlines()), f"README.md's line count of {path}"
