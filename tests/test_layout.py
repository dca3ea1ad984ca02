"""The shape of lit_lora/ that a learner relies on: who imports whom, and how long the files are.

The course (model.py -> lora.py -> the training loop -> sampling) must read without the periphery: model.py
imports nothing of lit_lora, lora.py only model.py, the core (model, tokenizer, checkpoint I/O, the CLI's errors,
file I/O, report) imports no method and no format, and no module imports itself round a circle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_lora"
CORE = {"model", "tokenizer", "checkpoint", "files", "cli", "report"}
METHODS = {"lora", "adapter", "quantize", "method_files"}


def module_name(path: Path) -> str:
    """lit_lora/convert/hf.py -> "convert.hf"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """The lit_lora modules `path` imports, anywhere in it (inside functions too), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_lora"):
            found.add(node.module.removeprefix("lit_lora").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("lit_lora.") for alias in node.names if alias.name.startswith("lit_lora.")}
    return {name for name in found if name}


GRAPH = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_model_imports_nothing_of_lit_lora_and_lora_only_model():
    assert GRAPH["model"] == set()
    assert GRAPH["lora"] == {"model"}
    assert GRAPH["adapter"] == {"model"}


def test_the_core_imports_no_method_and_no_format():
    for module in CORE:
        assert GRAPH[module] <= CORE, f"{module} imports {GRAPH[module] - CORE}"


def test_only_the_formats_and_the_scripts_import_the_formats():
    for module, imported in GRAPH.items():
        if not module.startswith("convert"):
            assert not {name for name in imported if name.startswith("convert")}, module


def test_no_import_circle():
    def visit(module: str, path: list[str]) -> None:
        for imported in GRAPH.get(module, ()):
            assert imported not in path, f"import circle: {' -> '.join(path + [imported])}"
            visit(imported, path + [imported])

    for module in GRAPH:
        visit(module, [module])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p) or "__init__")
def test_files_stay_readable_in_length(path):
    """model.py reads top to bottom in at most 350 lines; no file of lit_lora is over 400."""
    limit = 350 if path.name == "model.py" else 400
    assert len(path.read_text().splitlines()) <= limit


COURSE = ["model.py", "lora.py", "train.py", "generation.py"]


def test_the_course_is_at_most_1000_lines_and_starts_the_math_early():
    """The course (model.py -> lora.py -> the loop -> sampling) reads as nanoGPT does: the checks of files and flags,
    the printing and the timing live in the periphery that calls it; model.py reaches RMSNorm within 90 lines."""
    lengths = {name: len((PACKAGE / name).read_text().splitlines()) for name in COURSE}
    assert sum(lengths.values()) <= 1000, lengths
    model_lines = (PACKAGE / "model.py").read_text().splitlines()
    assert next(i for i, line in enumerate(model_lines, 1) if line.startswith("class RMSNorm")) <= 90


def test_the_course_checks_no_flag_and_prints_nothing_itself():
    """train.py does not import quantize (to check a flag) or the CLI; generation.py prints and times nothing."""
    assert not GRAPH["train"] & {"quantize", "cli"}
    generation = (PACKAGE / "generation.py").read_text()
    assert "print(" not in generation and "perf_counter" not in generation
