"""The documentation runs as written.

* Every fenced ```python block in README.md and docs/*.md is executed, each in a fresh namespace and an empty
  temporary working directory, with one torch thread; any exception fails its test (id ``FILE:LINE``, the line of
  the opening fence).
  Blocks fenced ```python-norun are collected as skipped (they need something the test machine lacks, or an API
  that is not there yet).
* Every ``separify convert|report|compare`` command in a shell block, and every ``--option`` named in
  docs/cli.md, exists in that command's ``--help``.
* Relative links in README.md, docs/*.md and benchmarks/RESULTS.md point at files that exist, and their
  ``#anchors`` at headings that exist.
* The README stays a README: at most 200 lines, with the quick-start and test commands that CI runs, verbatim.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "benchmarks" / "RESULTS.md"]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)

QUICK_START = "pip install . && separify convert -o fashion_separable.pt2 --html report.html"
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(paths, languages: set[str]) -> list[tuple[str, str, str]]:
    """``(id, language, code)`` of every fenced block in ``paths`` whose info string is one of ``languages``."""
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) in languages:
                line = text.count("\n", 0, m.start()) + 1
                found.append((f"{_rel(path)}:{line}", m.group(1), m.group(2)))
    return found


PYTHON = blocks(DOCS, {"python", "python-norun"})


@pytest.mark.parametrize("code", [pytest.param(code, id=ident, marks=[pytest.mark.skip("fenced python-norun")]
                                               if lang == "python-norun" else [])
                                  for ident, lang, code in PYTHON])
def test_python_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("SEPARIFY_CACHE_DIR", str(tmp_path / "cache"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, more threads than free cores slow a block down several times
    try:
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)


def test_there_are_python_blocks() -> None:
    ran = [ident for ident, lang, _ in PYTHON if lang == "python"]
    assert any(i.startswith("README.md:") for i in ran), "the README needs a runnable library example"
    assert len(ran) >= 8, ran


# --- CLI options named in the docs exist


@lru_cache(maxsize=None)
def options_of(command: str) -> frozenset[str]:
    """The long option names of ``separify <command>``, read from the click command typer builds."""
    import typer.main

    from separify.cli import app

    params = typer.main.get_command(app).commands[command].params
    return frozenset(o for p in params for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))


def shell_commands() -> list[tuple[str, str, list[str]]]:
    """``(id, command, options)`` of every ``separify <command> ...`` in bash/sh blocks (continuation lines joined,
    comments dropped)."""
    found = []
    for ident, _, code in blocks(DOCS, {"bash", "sh", "shell", "console"}):
        for line in code.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not line:
                continue
            for part in re.split(r"&&|\|\||;|\|", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    words = part.split()
                if len(words) >= 2 and words[0] == "separify" and words[1] in ("convert", "report", "compare"):
                    found.append((ident, words[1], [w.split("=", 1)[0] for w in words[2:] if w.startswith("--")]))
    return found


SHELL = shell_commands()


@pytest.mark.parametrize("command, used", [pytest.param(c, o, id=f"{i} {c}") for i, c, o in SHELL])
def test_shell_examples_use_existing_options(command: str, used: list[str]) -> None:
    missing = sorted(set(used) - options_of(command))
    assert not missing, f"separify {command} has no option(s) {missing}"


def test_cli_doc_names_existing_options() -> None:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    code = " ".join(re.findall(r"`([^`\n]+)`", text))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    known = options_of("convert") | options_of("report") | options_of("compare") | {"--help", "--version"}
    assert not sorted(named - known), f"docs/cli.md names options no command has: {sorted(named - known)}"


def test_docs_have_shell_examples() -> None:
    assert {c for _, c, _ in SHELL} == {"convert", "report", "compare"}


# --- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_relative_links_resolve(path: Path) -> None:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, bad


# --- the README


def test_readme_is_short_and_keeps_the_ci_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    shell = [code.strip() for _, _, code in blocks([ROOT / "README.md"], {"bash"})]
    assert QUICK_START in shell, "the quick-start command must stay a block of its own, verbatim"
    assert TEST_COMMAND in shell, "the test command (what .ci/run runs) must stay a block of its own, verbatim"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci
