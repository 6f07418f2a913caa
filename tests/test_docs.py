"""The README and docs/*.md name only flags that exist, and their links and images resolve.

Which script a `--flag` belongs to:
- in a fenced code block, a command line (lines ending in a backslash joined) that runs `X.py` (a script of this
  repository: `sft.py`, ..., `bench/memory.py`) gives X every `--flag` after it, up to the next script, `&&`, `;`,
  `|` or the end of the line; flags before the script (accelerate launch's `--config_file`, torchrun's
  `--nproc_per_node`) are not checked. A quoted value of `--sft_args`, `--reward_args`, `--ppo_args` or
  `--eval_args` holds flags of sft.py, reward.py, ppo.py or evaluate.py. The same holds for an inline code span
  that names a script (`python bench/memory.py --validate`);
- in a table, a row whose first cell starts with `` `--flag `` documents the flags of its first cell for the script
  the section is about: the scripts named in the nearest heading that names any (`## Chat: `chat.py``), or, under
  headings that name none, any of the step scripts.

A script's flags are those of its module-level `make_parser()` (an argparse parser; TRL's parser also takes
`--config`). The step scripts must have one; a bench script or plots.py without one is not checked.
"""

import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STEP_SCRIPTS = ("sft.py", "reward.py", "ppo.py", "dpo.py", "train.py", "evaluate.py", "chat.py")
STEP_ARGS = {"--sft_args": "sft.py", "--reward_args": "reward.py", "--ppo_args": "ppo.py", "--eval_args": "evaluate.py"}
# Scripts that also take every flag of others: bench/memory.py plans any step from its own flags, and
# bench/ppo_step.py runs ppo.py's iteration.
ALSO_TAKES = {"bench/memory.py": ("sft.py", "reward.py", "ppo.py", "dpo.py"), "bench/ppo_step.py": ("ppo.py",)}

FLAG = re.compile(r"--[A-Za-z][\w-]*")
TOKEN = re.compile(r"""--[\w-]+=(?:"[^"]*"|'[^']*')|"[^"]*"|'[^']*'|\S+""")
SPAN = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SEPARATORS = {"&&", "||", ";", "|"}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def known_scripts() -> set[str]:
    return {rel(p) for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]}


def script_of(token: str, scripts: set[str]) -> str | None:
    """The repository script a token runs (`sft.py`, `./bench/memory.py`), '' for another .py, None for no .py."""
    token = token.rstrip(",;:)").lstrip("(")
    if not token.endswith(".py"):
        return None
    token = token.removeprefix("./")
    return token if token in scripts else ""


def command_flags(line: str, scripts: set[str]) -> list[tuple[str, str]]:
    """(script, flag) for each flag a command line gives a script (see the module's docstring)."""
    found, current = [], None
    tokens = TOKEN.findall(line)
    for index, token in enumerate(tokens):
        value = None
        if token.startswith("--") and "=" in token:
            token, value = token.split("=", 1)
        elif index + 1 < len(tokens):
            value = tokens[index + 1]
        if token in SEPARATORS or token.endswith(";"):
            current = None
            continue
        if token[:1] in "\"'":
            continue  # a quoted value: its flags were taken with the option before it
        script = script_of(token, scripts)
        if script is not None:
            current = script or None
            continue
        if current and FLAG.fullmatch(token):
            found.append((current, token))
        if token in STEP_ARGS and value and value[:1] in "\"'" and value[-1:] == value[:1]:
            found.extend((STEP_ARGS[token], flag) for flag in FLAG.findall(value[1:-1]))
    return found


def section_scripts(headings: list[str], scripts: set[str]) -> tuple[str, ...] | None:
    """The scripts named in the nearest heading that names any; None when no heading above does."""
    for heading in reversed(headings):
        named = [s for span in SPAN.findall(heading) for s in [script_of(span, scripts)] if s]
        if named:
            return tuple(named)
    return None


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def documented_flags(page: Path, scripts: set[str] | None = None) -> list[tuple[int, str | tuple | None, str, str]]:
    """(line number, script / the section's scripts / None for any, flag, where) for each flag the page names."""
    scripts = known_scripts() if scripts is None else scripts
    found, headings, lines = [], [], page.read_text().split("\n")
    in_code, pending, paragraph = False, "", []

    def flush_paragraph():
        if paragraph:
            text = " ".join(line for _, line in paragraph)
            for span in SPAN.findall(text):
                found.extend((paragraph[0][0], s, f, "inline code") for s, f in command_flags(span, scripts))
            paragraph.clear()

    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            flush_paragraph()
            if pending:
                found.extend((number, s, f, "code block") for s, f in command_flags(pending, scripts))
                pending = ""
            in_code = not in_code
            continue
        if in_code:
            pending += line
            if line.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1] + " "
                continue
            found.extend((number, s, f, "code block") for s, f in command_flags(pending, scripts))
            pending = ""
            continue
        heading = HEADING.match(line)
        if heading:
            flush_paragraph()
            level = len(heading.group(1))
            headings[level - 1:] = [heading.group(2)]
            continue
        if line.lstrip().startswith("|"):
            flush_paragraph()
            for span in SPAN.findall(line):
                found.extend((number, s, f, "inline code") for s, f in command_flags(span, scripts))
            cells = table_cells(line)
            if cells and cells[0].startswith("`--"):
                owner = section_scripts(headings, scripts)
                for span in SPAN.findall(cells[0]):
                    found.extend((number, owner, flag, f"table under {headings[-1]!r}" if headings else "table")
                                 for flag in FLAG.findall(span))
            continue
        if line.strip():
            paragraph.append((number, line))
        else:
            flush_paragraph()
    flush_paragraph()
    return found


@lru_cache(maxsize=None)
def parser_flags(script: str) -> frozenset | None:
    """The option strings of `script`'s make_parser(); None for a script without one that need not have one."""
    path = ROOT / script
    module = sys.modules.get(path.stem)  # already imported by another test: the same module
    if module is None or Path(getattr(module, "__file__", None) or "").resolve() != path.resolve():
        # Imported by path under a name of its own: a top-level `evaluate.py` must not replace HF's `evaluate`.
        name = "docs_check_" + script[:-3].replace("/", "_")
        module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    if not hasattr(module, "make_parser"):
        assert script not in STEP_SCRIPTS, f"{script} defines no module-level make_parser()"
        return None
    parser = module.make_parser()
    flags = set(parser._option_string_actions)
    if hasattr(parser, "parse_args_and_config"):  # TRL's parser reads --config itself
        flags.add("--config")
    return frozenset(flags)


def accepted_flags(script: str) -> frozenset | None:
    own = parser_flags(script)
    if own is None:
        return None
    return own.union(*(parser_flags(other) or () for other in ALSO_TAKES.get(script, ())))


def test_extraction_sees_every_step_script():
    """A guard for the checks below: the docs give flags to each step script, so a broken extraction cannot pass."""
    seen = {script for page in PAGES for _, script, _, _ in documented_flags(page) if isinstance(script, str)}
    assert set(STEP_SCRIPTS) <= seen, f"no documented flags found for {sorted(set(STEP_SCRIPTS) - seen)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_documented_flags_exist(page):
    scripts = known_scripts()
    all_flags = None
    missing = []
    for number, owner, flag, where in documented_flags(page, scripts):
        if isinstance(owner, str):
            owners = (owner,)
        elif owner:
            owners = owner
        else:  # a table under headings that name no script: any step script's flag will do
            if all_flags is None:
                all_flags = frozenset().union(*(accepted_flags(s) for s in STEP_SCRIPTS))
            if flag not in all_flags:
                missing.append(f"{rel(page)}:{number} ({where}): no step script ({', '.join(STEP_SCRIPTS)}) has {flag}")
            continue
        accepted = [accepted_flags(s) for s in owners]
        if all(a is None for a in accepted):
            continue  # a bench script without make_parser()
        if not any(a is not None and flag in a for a in accepted):
            missing.append(f"{rel(page)}:{number} ({where}): {' / '.join(owners)} has no {flag}")
    assert not missing, "documented flags that the scripts do not have:\n" + "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset:
    found, counts, in_code = set(), {}, False
    for line in page.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := HEADING.match(line)):
            base = slug(heading.group(2))
            found.add(base if base not in counts else f"{base}-{counts[base]}")
            counts[base] = counts.get(base, 0) + 1
    return frozenset(found)


def relative_links(page: Path):
    """(line number, is an image, target) for each link that is not a URL, outside code (a link may span lines)."""
    lines, in_code = page.read_text().split("\n"), False
    for index, line in enumerate(lines):
        fence = line.lstrip().startswith("```")
        if fence or in_code:
            lines[index] = ""
        in_code ^= fence
    text = SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group(0)), "\n".join(lines))
    for link in LINK.finditer(text):
        bang, target = link.group(1), link.group(3)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):
            yield text.count("\n", 0, link.start()) + 1, bool(bang), target


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {target.split("#")[0] for _, _, target in relative_links(readme)}
    for target in sorted(t for t in linked if t.startswith("docs/") and t.endswith(".md")):
        assert (ROOT / target).is_file(), f"README.md links {target}, which does not exist"
    unlinked = sorted(rel(p) for p in PAGES[1:] if rel(p) not in linked)
    assert not unlinked, f"README.md links no {', '.join(unlinked)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_and_images_resolve(page):
    broken = []
    for number, image, target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{rel(page)}:{number}: {'image' if image else 'link'} {target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{rel(page)}:{number}: link {target}: {rel(path)} has no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)
