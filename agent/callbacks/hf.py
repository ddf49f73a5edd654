"""The Hugging Face ``transformers.Trainer`` callback's hooks (see wattmeter.callbacks)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .core import Tracker, TrackerAccess

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Meter

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


class _HFHooks(TrackerAccess):
    """Meters a ``transformers.Trainer`` run.

    on_train_begin opens a window and the first step's request; on_step_end counts
    ``state.num_input_tokens_seen`` growth (set ``include_num_input_tokens_seen`` in
    TrainingArguments) as "training" tokens of that step and ends its request; on_log
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
        self.tracker = Tracker(meter, name)
        self.log_every = log_every
        self._active = False
        self._seen = 0
        self._in_eval = False
        self._done = False

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
