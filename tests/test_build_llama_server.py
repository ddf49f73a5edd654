"""tools/build_llama_server.sh reuses a cached llama-server keyed by version and builds nothing then."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "build_llama_server.sh"
BASH = shutil.which("bash") or "/bin/bash"


def plumbing_only(tmp_path: Path) -> str:
    """A PATH with the script's own plumbing but no pip, cmake or compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "flock", "rm"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def run(cache: Path, version: str, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "LLAMA_CPP_PYTHON_VERSION": version, "PATH": path}
    return subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)


def fake_binary(cache: Path, version: str) -> Path:
    binary = cache / "wattmeter" / f"llama-server-{version}"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\necho 'version: test'\n")
    binary.chmod(0o755)
    return binary


def test_a_cached_binary_that_runs_is_reused_per_version(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, "9.9.9")
    # No pip, cmake or compiler on PATH: a rebuild would fail, so success means reuse.
    out = run(tmp_path, "9.9.9", plumbing_only(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{binary}\n" and out.stderr == ""


def test_another_version_is_not_served_from_the_cache_and_a_missing_tool_is_named(tmp_path: Path) -> None:
    fake_binary(tmp_path, "9.9.9")
    out = run(tmp_path, "9.9.8", plumbing_only(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == "build_llama_server: cmake not found; install it (Debian: cmake g++)"
    assert not (tmp_path / "wattmeter" / "llama-server-9.9.8").exists()
