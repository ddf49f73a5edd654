"""Every ```sh / ```python example in README.md and docs/*.md runs, unless the line before
its fence says why it cannot run here:

    <!-- docs-test: skip REASON -->        never run (GPU-only, k8s, interactive, ...)
    <!-- docs-test: needs TOOL -->         skipped when TOOL is not on PATH
    <!-- docs-test: prelude CODE -->       Python run before the block (defines a placeholder)

Blocks without a language (command output, formats) are text, not examples. A block runs in
the repository root with a temporary HOME, this venv's Python first on PATH, and a 120 s limit.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(sh|bash|python)\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!-- docs-test: (skip|needs|prelude) (.*?) -->")


@dataclass
class Example:
    path: Path
    line: int
    lang: str
    code: str
    marks: list[tuple[str, str]]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def examples() -> list[Example]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip("\n").splitlines()
            marks = []
            while before and MARK.fullmatch(before[-1].strip()):   # marks stacked right above the fence
                marks.append(MARK.fullmatch(before.pop().strip()).groups())
            out.append(Example(path, text[:m.start()].count("\n") + 1, m.group(1), m.group(2), marks))
    return out


ALL = examples()


def test_every_skip_says_why():
    for ex in ALL:
        for kind, arg in ex.marks:
            assert len(arg.split()) >= (1 if kind == "needs" else 3), f"{ex.id}: '{kind}' needs a reason: {arg!r}"


def test_examples_use_python3_not_a_bare_python():
    """Debian and Ubuntu have no `python` command unless python-is-python3 is installed."""
    for ex in ALL:
        if ex.lang in ("sh", "bash"):
            assert not re.search(r"(^|[\s;&|(])python(\s|$)", ex.code, re.M), f"{ex.id}: use python3"


# Shell examples run only when every command is one of these: a new example that installs or
# deploys something must be marked skip (with the reason), never run by accident in CI.
SAFE_COMMANDS = {"wattmeter", "python3", "promtool", "jq", "head", "grep", "cat", "echo"}


def _commands(code: str) -> list[str]:
    """The first word of every command (after pipes, && and ;), quotes understood."""
    lexer = shlex.shlex(code.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace = " \t\r"         # keep newlines: they end commands too
    lexer.commenters = "#"
    words, start = [], True
    for token in lexer:
        if token in ("\n", "|", "||", "&&", ";", "&", "(", ")"):
            start = True
        elif start and not re.match(r"^[A-Z_][A-Z0-9_]*=", token):
            words.append(token)
            start = False
    return words


@pytest.mark.parametrize("ex", ALL, ids=[e.id for e in ALL])
def test_example_runs(ex: Example, tmp_path):
    prelude = ""
    for kind, arg in ex.marks:
        if kind == "skip":
            pytest.skip(arg)
        if kind == "needs" and not shutil.which(arg):
            pytest.skip(f"{arg} is not installed")
        if kind == "prelude":
            prelude += arg + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
               PYTHONPATH=str(tmp_path))
    if ex.lang == "python":
        cmd = [sys.executable, "-c", prelude + ex.code]
    else:
        unsafe = [w for w in _commands(ex.code) if w not in SAFE_COMMANDS]
        assert not unsafe, f"{ex.id}: runs {unsafe}; mark it <!-- docs-test: skip REASON --> or extend SAFE_COMMANDS"
        cmd = ["bash", "-euo", "pipefail", "-c", ex.code]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{ex.id} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
