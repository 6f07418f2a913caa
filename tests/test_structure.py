"""The layout the README promises: the package's modules each have one job (a one-line docstring), stay small, import
no step script and form no import circle; bench/ imports the package, not the step scripts (two exceptions below)."""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "simple_rlhf"
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}  # sft, reward, ppo, train, evaluate, chat, plots
MAX_LINES = 560
# bench scripts that measure ppo.py itself in-process: its own argument dataclass and loop (memory.py parses a step's
# flags to plan it; memory_validate.py profiles ppo.main with the models handed in).
READS_STEP_SCRIPTS = {"memory.py": {"sft", "reward", "ppo", "dpo"}, "memory_validate.py": {"ppo"}}  # "about 500": ppo.py's loop and arguments stay readable in one file


def imported_modules(path: Path) -> set[str]:
    """Top-level module names and simple_rlhf submodules that `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "simple_rlhf":
                names |= {f"simple_rlhf.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


def package_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        imported = imported_modules(PACKAGE / f"{name}.py")
        graph[name] = {m.split(".", 1)[1].split(".")[0] for m in imported if m.startswith("simple_rlhf.")} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(package_graph())
    assert cycle is None, f"import circle in simple_rlhf: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")) + sorted((ROOT / "bench").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_package_and_bench_import_no_step_script(path):
    scripts = imported_modules(path) & SCRIPTS
    if path.parent.name == "bench":
        scripts -= READS_STEP_SCRIPTS.get(path.name, set())
    assert not scripts, f"{path.relative_to(ROOT)} imports the step script(s) {sorted(scripts)}; import the package"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")) + sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_modules_are_small_and_say_their_job(path):
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by job (at most ~500)"
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring and docstring.splitlines()[0].strip(), f"{path.relative_to(ROOT)} opens with no line on its job"


def test_no_common_module_is_left():
    assert not (ROOT / "common.py").exists() and not (ROOT / "memory_plan.py").exists()


def test_pyproject_pins_the_same_requirements():
    import tomllib

    def pins(lines):
        return sorted(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == pins((ROOT / "requirements.txt").read_text().splitlines())
    assert sorted(project["optional-dependencies"]["test"]) == pins(
        (ROOT / "requirements-test.txt").read_text().splitlines())
    assert project["dependencies"] and all("==" in pin for pin in project["dependencies"])
