"""wattmeter: meter the energy, power and carbon of GPU workloads."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Meter", "measure", "get_meter", "WindowResult", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .meter import Meter, get_meter, measure
    from .model import WindowResult


def __getattr__(name: str) -> Any:
    # Lazy so that `import wattmeter` stays cheap (no psutil/pynvml import until used).
    if name in ("Meter", "measure", "get_meter"):
        from . import meter

        return getattr(meter, name)
    if name == "WindowResult":
        from .model import WindowResult

        return WindowResult
    raise AttributeError(f"module 'wattmeter' has no attribute {name!r}")
