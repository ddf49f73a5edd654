"""Training integrations: a Hugging Face ``Trainer`` callback and a Lightning callback.

    from wattmeter.callbacks import hf_callback
    args = TrainingArguments(..., include_num_input_tokens_seen=True)   # needed for J/token
    Trainer(..., args=args, callbacks=[hf_callback()]).train()

    from wattmeter.callbacks import lightning_callback
    pl.Trainer(callbacks=[lightning_callback(tokens_per_batch=lambda b: b["input_ids"].numel())])

Each training log gets three sets of figures (see docs/callbacks.md):
cumulative since training began (``energy_j``, ``energy_kwh``, ``avg_power_w``,
``joules_per_token``), the logging interval since the previous log (``interval_energy_j``,
``interval_avg_power_w``, ``interval_tokens``, ``interval_joules_per_token``) and the last
optimizer step (``step_energy_j``, ``step_tokens``, ``step_joules_per_token``). Every optimizer step
is a request of the per-request accounting (wattmeter.requests; see .core): a log counts the
steps that have become final since the previous one, without blocking, and the intervals of all
logs sum to the final log's cumulative figures, which are the window's exact result.
Where the trainer knows ``max_steps``, logs also carry the projection to completion
(``progress``, ``projected_energy_kwh`` and its ``_low``/``_high`` band, ``projected_remaining_s``);
``value_from_logs(metric="unit")`` adds ``<unit>_per_kwh`` (see docs/decisions.md).

Importing this module imports neither framework. ``WattmeterHFCallback`` and
``WattmeterLightningCallback`` are built on first access and subclass the framework's
callback class when it is importable; without it they are plain classes with the same hooks.
The hooks rely only on the documented hook signatures and a few documented attributes
(``state.num_input_tokens_seen``, ``state.global_step``, ``trainer.global_step``,
``trainer.log_every_n_steps``, ``trainer.loggers``), so they can be driven by stand-in objects.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .core import TRAINING, gpu_notice
from .hf import _HF_EVENTS, _HFHooks, _hf_base
from .lightning import _LightningHooks, _lightning_base

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter


# -- lazy classes and factories ----------------------------------------------------------
_BUILDERS: dict[str, tuple[type, Callable[[], type]]] = {
    "WattmeterHFCallback": (_HFHooks, _hf_base),
    "WattmeterLightningCallback": (_LightningHooks, _lightning_base),
}


def __getattr__(name: str) -> Any:
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    hooks, base = _BUILDERS[name]
    cls = type(name, (hooks, base()), {"__module__": __name__, "__doc__": hooks.__doc__})
    globals()[name] = cls     # built once; later lookups find it directly
    return cls


def _cls(name: str) -> type:
    return globals().get(name) or __getattr__(name)


def hf_callback(meter: "Meter | None" = None, name: str = "train", log_every: int | None = None) -> Any:
    """A WattmeterHFCallback (transformers.TrainerCallback when transformers is installed)."""
    return _cls("WattmeterHFCallback")(meter, name, log_every)


def lightning_callback(meter: "Meter | None" = None, name: str = "train", log_every: int | None = None,
                       tokens_per_batch: Callable[[Any], int] | None = None) -> Any:
    """A WattmeterLightningCallback (lightning's Callback when Lightning is installed)."""
    return _cls("WattmeterLightningCallback")(meter, name, log_every, tokens_per_batch)


__all__ = ["WattmeterHFCallback", "WattmeterLightningCallback", "hf_callback", "lightning_callback", "gpu_notice",
           "TRAINING"]
