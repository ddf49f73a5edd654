"""The fake NVML as a ``pynvml`` module, and installing it as ``sys.modules["pynvml"]``.

``build_module(fake)`` gives a module with every name of the real nvidia-ml-py module, its driver
calls replaced by the fake's (``FakeNVML``, sim/fake_nvml.py) or by stubs that raise, so nothing
reaches a real GPU. ``install(fake)`` puts it in ``sys.modules`` so that other meters (CodeCarbon,
Zeus) imported afterwards read the same simulated GPUs; ``real_pynvml()`` is the genuine module
all the while. ``wattmeter.sim.fake_nvml`` exports all of these.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import types
from typing import TYPE_CHECKING, Iterator

import pynvml as _pynvml_at_import

from ..sensors.base import SimulatedNvml

if TYPE_CHECKING:  # pragma: no cover
    from .fake_nvml import FakeNVML

# pynvml's pure Python helpers: no driver behind them, so the real ones serve the fake too.
PURE_HELPERS = frozenset({"nvmlExceptionClass", "nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct"})


def real_pynvml() -> types.ModuleType:
    """The genuine nvidia-ml-py module, even while a fake is installed."""
    mod = sys.modules.get("pynvml")
    if isinstance(mod, SimulatedNvml):
        return mod._WATTMETER_REAL
    return mod if mod is not None else _pynvml_at_import


_installed: list[types.ModuleType | None] = []   # what sys.modules["pynvml"] held before each install


def build_module(fake: "FakeNVML") -> types.ModuleType:
    """A ``pynvml`` module: every attribute of the real one, driver calls replaced by the fake's."""
    real = real_pynvml()
    mod = SimulatedNvml("pynvml", real.__doc__)
    skip = {"__name__", "__spec__", "__loader__", "__package__", "__builtins__", "__cached__", "__doc__"}
    simulated = [name for name in dir(type(fake)) if name.startswith("nvml")]
    no_stub = PURE_HELPERS.union(simulated)   # the simulated ones are set below
    ns = mod.__dict__   # filled directly: ~2500 names, set on every simulated Meter's construction
    for name, value in vars(real).items():
        if name in skip:
            continue
        if name.startswith("nvml") and name not in no_stub and inspect.isfunction(value):
            value = fake.not_simulated(name)
        ns[name] = value
    for name in simulated:
        ns[name] = getattr(fake, name)
    # No shared library behind the fake: every function pointer lookup fails.
    mod._nvmlGetFunctionPointer = fake.not_simulated("_nvmlGetFunctionPointer", real.NVML_ERROR_FUNCTION_NOT_FOUND)
    mod._LoadNvmlLibrary = lambda: None
    mod.clock = fake.clock
    mod.WATTMETER_FAKE = True          # for other code that asks (a declared type is for ours)
    mod.WATTMETER_FAKE_NVML = fake
    mod._WATTMETER_REAL = real
    return mod


def install(fake: "FakeNVML") -> types.ModuleType:
    """Put the fake in ``sys.modules["pynvml"]``. Code that imports pynvml afterwards gets it;
    modules that imported pynvml before keep the real one (install first)."""
    mod = build_module(fake)
    _installed.append(sys.modules.get("pynvml"))
    sys.modules["pynvml"] = mod
    return mod


def uninstall() -> None:
    """Undo the latest ``install`` (a no-op when nothing is installed)."""
    if not _installed:
        return
    previous = _installed.pop()
    if previous is None:
        sys.modules.pop("pynvml", None)
    else:
        sys.modules["pynvml"] = previous


@contextlib.contextmanager
def installed(fake: "FakeNVML") -> Iterator[types.ModuleType]:
    """``with installed(FakeNVML(scenario, clock)) as pynvml: ...``"""
    mod = install(fake)
    try:
        yield mod
    finally:
        uninstall()
