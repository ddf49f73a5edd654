"""The README's first command, run as a new user would: a fresh clone, an empty HOME and
PATH=/usr/bin:/bin, so only the system python3 is seen (no `python` alias, PEP 668 pip)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The one-line commands under '## Two commands' in README.md, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_two_one_line_commands_without_bare_python():
    cmds = readme_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert cmds[1] == "bash tools/test.sh"
    # a bare `python` is missing on Debian/Ubuntu without python-is-python3
    assert not re.search(r"(^|[\s/])python(\s|$)", cmds[0]), cmds[0]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec bash tools/test.sh")


@pytest.mark.slow
def test_first_readme_command_works_from_a_fresh_clone(tmp_path):
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 (the system Python this test is about)")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the system python3 has no venv module (Debian: apt-get install python3-venv)")
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone from")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    home = tmp_path / "home"
    home.mkdir()
    # Only the machine's pip settings (index mirror, certificates) pass; nothing from this venv.
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")}
    env.update(HOME=str(home), PATH="/usr/bin:/bin", LANG="C.UTF-8")
    proc = subprocess.run(["bash", "-c", readme_commands()[0]], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and re.search(r"No matching distribution|Could not find a version|"
                                          r"Failed to establish|Network is unreachable", proc.stderr):
        pytest.skip("the package index cannot be reached from here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workload:" in proc.stdout
    records = (clone / "wattmeter-records.jsonl").read_text().splitlines()
    record = json.loads(records[-1])
    assert record["exit_code"] == 0 and record["energy_j"]["total"] > 0
    assert "record appended to wattmeter-records.jsonl" in proc.stderr
