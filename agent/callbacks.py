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
optimizer step (``step_energy_j``, ``step_tokens``, ``step_joules_per_token``). Running figures
are read from the ledger without blocking; the final log carries the exact window result.
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

import importlib
import logging
import sys
from dataclasses import dataclass
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
log = logging.getLogger("wattmeter.callbacks")


def _energy_j(snapshot: Mapping[str, "DeviceSnapshot"]) -> float:
    """Total energy now, choosing devices as WindowResult does: per component the process-tree
    share where one exists, else the host figure (so CPU is not counted twice)."""
    total = 0.0
    for comp in Component:
        parts = [s for s in snapshot.values() if s.device.component == comp]
        scoped = [s for s in parts if s.device.scope == Scope.PROCESS]
        total += sum(s.energy_j for s in scoped or parts)
    return total


def _data_t(snapshot: Mapping[str, "DeviceSnapshot"]) -> float | None:
    """Time of the newest reading in the ledger: the figures are only as fresh as this."""
    times = [s.t for s in snapshot.values() if s.t is not None]
    return max(times) if times else None


@dataclass(frozen=True)
class _Mark:
    """Where an interval starts: energy, time and tokens counted so far."""

    energy_j: float
    t: float
    tokens: int


def _span(prefix: str, start: _Mark, end: _Mark) -> dict[str, float]:
    energy = max(0.0, end.energy_j - start.energy_j)
    elapsed = end.t - start.t
    tokens = end.tokens - start.tokens
    out = {f"{prefix}energy_j": energy, f"{prefix}avg_power_w": energy / elapsed if elapsed > 0 else 0.0,
           f"{prefix}tokens": float(tokens)}
    if tokens > 0:
        out[f"{prefix}joules_per_token"] = energy / tokens
    return out


def gpu_notice(meter: "Meter") -> str | None:
    """One line saying when the GPU figures are not measured ones, else None."""
    gpus = [d for d in meter.ledger.devices if d.component == Component.GPU]
    if not gpus:
        return "wattmeter: no GPU is metered (none found or --no-gpu); energy covers CPU and RAM only"
    if meter.simulated:
        return f"wattmeter: the {len(gpus)} GPU(s) are SIMULATED (fake NVML); energy figures are not measurements"
    return None


class _Tracker:
    """One window over training, plus running figures read from the ledger without blocking
    (a window's exact result waits for the sampler; a log call every step must not)."""

    def __init__(self, meter: "Meter | None", name: str) -> None:
        self._meter = meter
        self.name = name
        self.window: Window | None = None
        self.result: WindowResult | None = None
        self.tokens = 0
        self.notice: str | None = None
        self._start = _Mark(0.0, 0.0, 0)
        self._interval = self._start
        self._step = self._start
        self._last_step: dict[str, float] = {}
        self._logged_t: float | None = None
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

    def _now(self) -> _Mark:
        snap = self.meter.snapshot()
        t = _data_t(snap)
        return _Mark(_energy_j(snap), self.meter.clock.now() if t is None else t, self.tokens)

    def begin(self) -> None:
        m = self.meter
        self.window = m.window(self.name)
        self.result = None
        self.tokens = 0
        self._start = self._interval = self._step = self._now()
        self._last_step = {}
        self._logged_t = None
        self.progress = StepProgress()     # a new window: the fit starts over from its energy
        self.notice = gpu_notice(m)
        if self.notice:
            log.warning(self.notice)

    def count(self, n: int) -> None:
        if n > 0:
            self.meter.add_tokens(n, TRAINING)
            self.tokens += n

    def step_done(self) -> None:
        """An optimizer step ended: its figures are the ledger's movement since the last one."""
        now = self._now()
        self._last_step = _span("step_", self._step, now)
        self._step = now

    @property
    def fresh(self) -> bool:
        """Has the ledger a reading newer than the last log? (else a log would repeat old figures)"""
        return self._logged_t is None or _data_t(self.meter.snapshot()) != self._logged_t

    def figures(self) -> dict[str, float]:
        """Cumulative figures since begin() (no interval bookkeeping)."""
        now = self._now()
        cum = _span("", self._start, now)
        cum.pop("tokens")
        cum["energy_kwh"] = cum["energy_j"] / 3.6e6
        cum.update(self.progress.figures())
        cum.update(self.logged.figures(cum["energy_j"]))
        return cum

    def step(self, step: Any, total: Any) -> None:
        """Progress ``step`` of ``total`` (ignored when the total is unknown), for the projection."""
        now = self._now()
        self.progress.step(now.t, step, total, max(0.0, now.energy_j - self._start.energy_j))

    def log_figures(self) -> dict[str, float]:
        """Cumulative, interval-since-last-log and last-step figures; starts a new interval."""
        now = self._now()
        out = self.figures()
        out.update(_span("interval_", self._interval, now))
        out.update(self._last_step)
        self._interval = now
        self._logged_t = _data_t(self.meter.snapshot())
        return out

    def final_figures(self) -> dict[str, float]:
        """Ends the window and returns its exact result (cumulative names), waiting for the sampler."""
        result = self.end()
        if result is None:
            return {}
        out = {"energy_j": result.total_energy_j, "energy_kwh": result.energy_kwh, "avg_power_w": result.avg_power_w}
        jpt = result.joules_per_token(TRAINING)
        if jpt is not None:
            out["joules_per_token"] = jpt
        out.update(self.progress.figures())
        out.update(self.logged.figures(result.total_energy_j))
        return out

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


def _hf_handler_class() -> type | None:
    try:
        from transformers.trainer_callback import CallbackHandler
    except ImportError:
        return None
    return CallbackHandler


class _HFHooks:
    """Meters a ``transformers.Trainer`` run.

    on_train_begin opens a window; on_step_end counts ``state.num_input_tokens_seen`` growth
    (set ``include_num_input_tokens_seen`` in TrainingArguments) as "training" tokens; on_log
    adds the cumulative, interval and step figures to training logs (and to the matching
    ``state.log_history`` entry, so ``trainer_state.json`` has them) but never to evaluation
    logs; the summary log ``train()`` writes after its last epoch (no step ``loss``) ends the
    window and carries its exact result, also kept in ``.result``. ``log_every=N`` asks the Trainer to log
    every N optimizer steps. Only the local main process meters: every rank on a node sees the
    same GPUs, and counting them per rank would multiply the energy.

    Trainer calls its reporting callbacks (TensorBoard, W&B, CSV-like loggers) before user
    callbacks and hands callbacks no reference to itself, so at its first event this callback
    moves itself to the front of the CallbackHandler that called it: plain
    ``callbacks=[hf_callback()]`` reaches every logger. ``install(trainer)`` does the same
    explicitly.
    """

    def __init__(self, meter: "Meter | None" = None, name: str = "train", log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.tracker = _Tracker(meter, name)
        self.log_every = log_every
        self._active = False
        self._seen = 0
        self._in_eval = False
        self._done = False

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
        self._first_in(trainer.callback_handler.callbacks)
        return self

    def _first_in(self, callbacks: list) -> None:
        if callbacks and callbacks[0] is self:
            return
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)

    def _move_first(self) -> None:
        """Find the CallbackHandler calling this event (two frames up: its on_<event>, then
        call_event) and put this callback first, so reporting callbacks see our fields."""
        handler_cls = _hf_handler_class()
        if handler_cls is None:
            return
        frame = sys._getframe(1)
        for _ in range(4):                     # on_<event> <- call_event <- handler.on_<event>
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if isinstance(owner, handler_cls):
                if self in owner.callbacks:
                    self._first_in(owner.callbacks)
                return
            frame = frame.f_back

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._move_first()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._move_first()                     # also covers trainer.add_callback() after __init__
        self._active = bool(getattr(state, "is_local_process_zero", True))
        self._in_eval = self._done = False
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
        self.tracker.step_done()
        self.tracker.step(getattr(state, "global_step", 0), getattr(state, "max_steps", 0))   # decisions
        if self.log_every and getattr(state, "global_step", 0) % self.log_every == 0:
            control.should_log = True

    # Evaluation runs prediction steps, then logs its metrics, then calls on_evaluate: the log
    # between them is an eval log whatever its metric prefix.
    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_eval = True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The loop is over when max_steps is reached or a callback stopped it (early stopping);
        # then the next log without a step "loss" is train()'s summary (train_runtime, train_loss).
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if getattr(control, "should_training_stop", False) or (max_steps and state.global_step >= max_steps):
            self._done = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_eval = False

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_eval = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not (self._active and self.tracker.open) or logs is None:
            return
        # Value metrics (an eval accuracy) are read from every log, eval logs included; the
        # figures, value per kWh among them, go only into training logs.
        self.tracker.logged.note(logs)
        if self._in_eval or any(str(k).startswith("eval_") for k in logs):
            return
        if self._done and "loss" not in logs:  # Trainer.train()'s summary log: the exact result
            figures = self.tracker.final_figures()
        else:
            figures = self.tracker.log_figures()
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
    tokens (if given) and, once per optimizer step on the steps Lightning writes to its loggers
    (every ``trainer.log_every_n_steps``, or every ``log_every`` steps if given), logs the
    figures through ``pl_module.log`` so every logger gets them; a step whose ledger has no new
    reading since the last log is skipped rather than written again with stale values.
    on_train_end (or on_exception) ends the window into ``.result`` and writes its exact
    figures to every logger and to ``trainer.logged_metrics``. Only local rank 0 meters.
    """

    def __init__(self, meter: "Meter | None" = None, name: str = "train", log_every: int | None = None,
                 tokens_per_batch: Callable[[Any], int] | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.tracker = _Tracker(meter, name)
        self.log_every = log_every
        self.tokens_per_batch = tokens_per_batch
        self._active = False
        self._step: int = 0
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
            self._step = int(getattr(trainer, "global_step", 0) or 0)
            self.tracker.begin()

    def _every(self, trainer: Any) -> int:
        if self.log_every is not None:
            return self.log_every
        return int(getattr(trainer, "log_every_n_steps", 1) or 1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not (self._active and self.tracker.open):
            return
        if self.tokens_per_batch is not None:
            self.tracker.count(int(self.tokens_per_batch(batch)))
        step = int(getattr(trainer, "global_step", 0) or 0)
        if step == self._step:
            return            # gradient accumulation: no optimizer step in this batch yet
        self._step = step
        self.tracker.step_done()
        self.tracker.step(step, getattr(trainer, "max_steps", -1))   # decisions: -1 (no limit) is ignored
        self.tracker.logged.note(getattr(trainer, "callback_metrics", None) or {})   # decisions
        if step % self._every(trainer) or step == self._logged_step or not self.tracker.fresh:
            return
        log = getattr(pl_module, "log", None)
        if callable(log):
            for key, value in self.tracker.log_figures().items():
                log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)
        self._logged_step = step

    def _finish(self, trainer: Any) -> None:
        self.tracker.logged.note(getattr(trainer, "callback_metrics", None) or {})   # decisions: latest value
        final = self.tracker.final_figures()
        if not final:
            return
        # pl_module.log() is refused in on_train_end: write to the loggers directly, and into
        # the dict Trainer.logged_metrics returns (the same dict each call), so both hold the
        # exact figures rather than the last running ones.
        step = int(getattr(trainer, "global_step", 0) or 0)
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(final, step=step)
            logger.save()
        logged = getattr(trainer, "logged_metrics", None)
        if isinstance(logged, dict):
            logged.update(final)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._active and self.tracker.open:
            self._finish(trainer)

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


__all__ = ["WattmeterHFCallback", "WattmeterLightningCallback", "hf_callback", "lightning_callback", "gpu_notice",
           "TRAINING"]
