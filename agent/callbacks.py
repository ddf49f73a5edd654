"""Training integrations: a Hugging Face ``Trainer`` callback and a Lightning callback.

    from wattmeter.callbacks import hf_callback
    trainer = Trainer(..., args=TrainingArguments(..., include_num_input_tokens_seen=True))
    hf_callback().install(trainer)          # first in line, so wandb/tensorboard see our fields
    trainer.train()

    from wattmeter.callbacks import lightning_callback
    pl.Trainer(callbacks=[lightning_callback(tokens_per_batch=lambda b: b["input_ids"].numel())])

Importing this module imports neither framework. ``WattmeterHFCallback`` and
``WattmeterLightningCallback`` are built on first access and subclass the framework's
callback class when it is importable; without it they are plain classes with the same hooks.
The hooks rely only on the documented hook signatures and a few documented attributes
(``state.num_input_tokens_seen``, ``state.global_step``, ``trainer.global_step``), so they can be
driven by stand-in objects.
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .model import Component, Scope
from .projection import StepProgress
from .value import LoggedValue

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import DeviceSnapshot
    from .meter import Meter
    from .model import WindowResult
    from .windows import Window

TRAINING = "training"     # the token kind training callbacks count under


def _energy_j(snapshot: Mapping[str, "DeviceSnapshot"]) -> float:
    """Total energy now, choosing devices as WindowResult does: per component the process-tree
    share where one exists, else the host figure (so CPU is not counted twice)."""
    total = 0.0
    for comp in Component:
        parts = [s for s in snapshot.values() if s.device.component == comp]
        scoped = [s for s in parts if s.device.scope == Scope.PROCESS]
        total += sum(s.energy_j for s in scoped or parts)
    return total


class _Tracker:
    """One window over training, plus running figures read from the ledger without blocking
    (a window's exact result waits for the sampler; a log call every step must not)."""

    def __init__(self, meter: "Meter | None", name: str) -> None:
        self._meter = meter
        self.name = name
        self.window: Window | None = None
        self.result: WindowResult | None = None
        self.tokens = 0
        self._t0 = 0.0
        self._e0 = 0.0
        self.progress = StepProgress()     # decisions: projection to completion from max_steps
        self.logged = LoggedValue()        # decisions: value from logged metrics

    @property
    def meter(self) -> "Meter":
        if self._meter is None:
            from .meter import get_meter   # the started process-wide meter, only when used

            self._meter = get_meter()
        return self._meter

    @property
    def open(self) -> bool:
        return self.window is not None and not self.window.ended

    def begin(self) -> None:
        m = self.meter
        self.window = m.window(self.name)
        self.result = None
        self.tokens = 0
        self._t0 = m.clock.now()
        self._e0 = _energy_j(m.snapshot())

    def count(self, n: int) -> None:
        if n > 0:
            self.meter.add_tokens(n, TRAINING)
            self.tokens += n

    def figures(self) -> dict[str, float]:
        m = self.meter
        energy = max(0.0, _energy_j(m.snapshot()) - self._e0)
        elapsed = m.clock.now() - self._t0
        out = {"energy_j": energy, "energy_kwh": energy / 3.6e6,
               "avg_power_w": energy / elapsed if elapsed > 0 else 0.0}
        if self.tokens:
            out["joules_per_token"] = energy / self.tokens
        out.update(self.progress.figures())
        out.update(self.logged.figures(energy))
        return out

    def step(self, step: Any, total: Any) -> None:
        """Progress ``step`` of ``total`` (ignored when the total is unknown)."""
        m = self.meter
        self.progress.step(m.clock.now(), step, total, max(0.0, _energy_j(m.snapshot()) - self._e0))

    def end(self) -> "WindowResult | None":
        if self.open:
            assert self.window is not None
            self.window.end()
            self.result = self.window.result()
        return self.result


# -- Hugging Face ----------------------------------------------------------------------
_HF_EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end",
              "on_step_end", "on_evaluate", "on_predict", "on_save", "on_log", "on_prediction_step")


class _HFNoops:
    """Stand-in for transformers.TrainerCallback when transformers is not installed."""


for _event in _HF_EVENTS:
    setattr(_HFNoops, _event, lambda self, args, state, control, **kwargs: None)
del _event


class _HFHooks:
    """Meters a ``transformers.Trainer`` run.

    on_train_begin opens a window; on_step_end counts ``state.num_input_tokens_seen`` growth
    (set ``include_num_input_tokens_seen`` in TrainingArguments) as "training" tokens; on_log
    adds energy_j, energy_kwh, avg_power_w and joules_per_token to the logs dict (and to the
    matching ``state.log_history`` entry); on_train_end ends the window into ``.result``.
    ``log_every=N`` asks the Trainer to log every N optimizer steps. Only the local main
    process meters: every rank on a node sees the same GPUs, and counting them per rank would
    multiply the energy.

    Trainer calls its reporting callbacks (wandb, tensorboard) before user callbacks; use
    ``.install(trainer)`` to put this one first so they see the fields in the same log call.
    """

    def __init__(self, meter: "Meter | None" = None, name: str = "train", log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.tracker = _Tracker(meter, name)
        self.log_every = log_every
        self._active = False
        self._seen = 0

    def value_from_logs(self, **keys: str) -> Any:
        """Count logged metrics as value, e.g. ``value_from_logs(eval_accuracy="accuracy")``: the
        logs then carry ``accuracy_per_kwh`` (decisions; see docs/decisions.md)."""
        self.tracker.logged.keys.update(keys)
        return self

    @property
    def result(self) -> "WindowResult | None":
        return self.tracker.result

    def figures(self) -> dict[str, float]:
        return self.tracker.figures() if self.tracker.window is not None else {}

    def install(self, trainer: Any) -> "_HFHooks":
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._active = bool(getattr(state, "is_local_process_zero", True))
        if self._active:
            self._seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)   # resumed runs start > 0
            self.tracker.begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not (self._active and self.tracker.open):
            return
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if seen > self._seen:
            self.tracker.count(seen - self._seen)
            self._seen = seen
        self.tracker.step(getattr(state, "global_step", 0), getattr(state, "max_steps", 0))   # decisions
        if self.log_every and getattr(state, "global_step", 0) % self.log_every == 0:
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not (self._active and self.tracker.open) or logs is None:
            return
        self.tracker.logged.note(logs)          # decisions: value from logged metrics
        figures = self.tracker.figures()
        logs.update(figures)
        history = getattr(state, "log_history", None)
        # Trainer appended a copy of logs before calling us: keep trainer_state.json in step.
        if history and isinstance(history[-1], dict) and history[-1].get("step") == getattr(state, "global_step", None):
            history[-1].update(figures)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._active:
            self.tracker.end()


def _hf_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        return _HFNoops
    return TrainerCallback


# -- Lightning -------------------------------------------------------------------------
class _LightningHooks:
    """Meters a Lightning ``Trainer.fit``.

    on_train_start opens a window; on_train_batch_end counts ``tokens_per_batch(batch)``
    tokens (if given) and logs the figures through ``pl_module.log`` every ``log_every``
    global steps (default: every batch; Lightning thins logger writes itself); on_train_end
    (or on_exception) ends the window into ``.result``. Only local rank 0 meters.
    """

    def __init__(self, meter: "Meter | None" = None, name: str = "train", log_every: int | None = None,
                 tokens_per_batch: Callable[[Any], int] | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.tracker = _Tracker(meter, name)
        self.log_every = log_every
        self.tokens_per_batch = tokens_per_batch
        self._active = False
        self._logged_step: int | None = None

    def value_from_logs(self, **keys: str) -> Any:
        """Count logged metrics as value, e.g. ``value_from_logs(eval_accuracy="accuracy")``: the
        logs then carry ``accuracy_per_kwh`` (decisions; see docs/decisions.md)."""
        self.tracker.logged.keys.update(keys)
        return self

    @property
    def result(self) -> "WindowResult | None":
        return self.tracker.result

    def figures(self) -> dict[str, float]:
        return self.tracker.figures() if self.tracker.window is not None else {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._active = int(getattr(trainer, "local_rank", 0) or 0) == 0
        if self._active:
            self._logged_step = None
            self.tracker.begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not (self._active and self.tracker.open):
            return
        if self.tokens_per_batch is not None:
            self.tracker.count(int(self.tokens_per_batch(batch)))
        step = int(getattr(trainer, "global_step", 0) or 0)
        self.tracker.step(step, getattr(trainer, "max_steps", -1))   # decisions: -1 (no limit) is ignored
        if self.log_every is not None and (step == 0 or step % self.log_every or step == self._logged_step):
            return   # global_step repeats across gradient-accumulation batches: log a step once
        self.tracker.logged.note(getattr(trainer, "callback_metrics", None) or {})   # decisions
        log = getattr(pl_module, "log", None)
        if callable(log):
            for key, value in self.tracker.figures().items():
                log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)
        self._logged_step = step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._active:
            self.tracker.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._active:
            self.tracker.end()     # a crashed run still gets its energy


def _lightning_base() -> type:
    names = ("lightning.pytorch", "pytorch_lightning")
    for mod in names:          # the flavour already in use wins: Trainer rejects the other's Callback
        if mod in sys.modules and hasattr(sys.modules[mod], "Callback"):
            return sys.modules[mod].Callback
    for mod in names:
        try:
            return importlib.import_module(mod).Callback
        except ImportError:
            continue
    return object


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


__all__ = ["WattmeterHFCallback", "WattmeterLightningCallback", "hf_callback", "lightning_callback", "TRAINING"]
