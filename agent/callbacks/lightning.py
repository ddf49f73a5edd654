"""The Lightning callback's hooks (see wattmeter.callbacks)."""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, Callable

from .core import Tracker, TrackerAccess

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter


class _LightningHooks(TrackerAccess):
    """Meters a Lightning ``Trainer.fit``.

    on_train_start opens a window; on_train_batch_end counts ``tokens_per_batch(batch)``
    tokens (if given) and, once per optimizer step on the steps Lightning writes to its loggers
    (every ``trainer.log_every_n_steps``, or every ``log_every`` steps if given), logs the
    figures through ``pl_module.log`` so every logger gets them; a log step where no optimizer
    step has become final since the last log is skipped rather than written again unchanged.
    on_train_end (or on_exception) ends the window into ``.result`` and writes its exact
    figures to every logger and to ``trainer.logged_metrics``. Only local rank 0 meters.
    """

    def __init__(self, meter: "Meter | None" = None, name: str = "train", log_every: int | None = None,
                 tokens_per_batch: Callable[[Any], int] | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.tracker = Tracker(meter, name)
        self.log_every = log_every
        self.tokens_per_batch = tokens_per_batch
        self._active = False
        self._step: int = 0
        self._logged_step: int | None = None

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
        if step % self._every(trainer) or step == self._logged_step or not self.tracker.settled():
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
