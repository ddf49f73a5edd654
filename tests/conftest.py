import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No proxy and no WATTMETER_* setting from the caller's shell, and the working folder is
    tmp_path (no wattmeter.toml or pyproject.toml of the caller's is read)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.startswith("WATTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
