"""Project errors. Usage errors become one line on stderr and exit code 2 in the CLI."""
from __future__ import annotations


class WattmeterError(Exception):
    """Base class for errors wattmeter raises on purpose."""


class UsageError(WattmeterError):
    """Bad input from the user: a flag, a file, a value. The message names the value and the fix."""

    exit_code = 2


class ScenarioError(UsageError):
    """A fake-NVML scenario that is missing or malformed. The message names the field path."""


class ConfigError(UsageError):
    """A bad configuration value (flag, WATTMETER_* variable or config file)."""
