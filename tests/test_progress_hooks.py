"""meter.progress / meter.add_value and the HF / Lightning callbacks' projection from max_steps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from wattmeter.errors import UsageError
from wattmeter.projection import ProgressError

from test_callbacks import hf_objects, make_meter, tick


def test_meter_progress_projects_to_completion() -> None:
    meter, clock = make_meter(gpu_w=200.0)
    assert meter.progress(0.0) is None
    p = None
    for i in range(1, 11):                   # 1 % per second at 200 W
        tick(meter, clock)
        p = meter.progress(i / 100.0)
    # 10 % after 10 s and 2,000 J: 100 s and 20,000 J at completion.
    assert p.total_j == pytest.approx(20_000.0) and p.end_t_s == pytest.approx(100.0)
    with pytest.raises(ProgressError, match=r"progress 1.2 is outside \[0, 1\]"):
        meter.progress(1.2)


def test_meter_progress_backwards_warns_not_crashes(caplog) -> None:
    meter, clock = make_meter()
    for i in range(1, 4):
        tick(meter, clock)
        meter.progress(i / 10.0)
    tick(meter, clock)
    assert meter.progress(0.1) is None
    assert "progress went backwards from 0.3 to 0.1" in caplog.text


def test_meter_add_value() -> None:
    meter, _clock = make_meter()
    meter.add_value(64, unit="images")
    meter.add_value(64, unit="images")
    assert meter.values.totals() == {"images": 128.0}
    with pytest.raises(UsageError):
        meter.add_value(float("nan"), unit="images")


def test_hf_callback_logs_projection_from_max_steps() -> None:
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter(gpu_w=200.0)
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    state.max_steps = 100
    cb.on_train_begin(args, state, control)
    for step in range(1, 11):                # one step a second at 200 W
        tick(meter, clock)
        state.global_step = step
        cb.on_step_end(args, state, control)
    logs: dict = {}
    cb.on_log(args, state, control, logs=logs)
    # 10 of 100 steps after 2,000 J: 20,000 J = 0.005556 kWh, 90 s to go.
    assert logs["progress"] == pytest.approx(0.1)
    assert logs["projected_energy_kwh"] == pytest.approx(20_000.0 / 3.6e6)
    assert logs["projected_energy_kwh_low"] < logs["projected_energy_kwh"] < logs["projected_energy_kwh_high"]
    assert logs["projected_remaining_s"] == pytest.approx(90.0)


def test_lightning_callback_projection_and_unknown_max_steps() -> None:
    from wattmeter.callbacks import lightning_callback

    class Module:
        def __init__(self) -> None:
            self.logged: dict = {}

        def log(self, name, value, **kw) -> None:
            self.logged[name] = value

    meter, clock = make_meter(gpu_w=100.0)
    cb = lightning_callback(meter=meter)
    trainer, module = SimpleNamespace(global_step=0, local_rank=0, max_steps=50), Module()
    cb.on_train_start(trainer, module)
    for step in range(1, 6):
        tick(meter, clock)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    assert module.logged["projected_energy_kwh"] == pytest.approx(5_000.0 / 3.6e6)   # 100 W x 50 s
    meter2, clock2 = make_meter()
    cb2 = lightning_callback(meter=meter2)
    t2, m2 = SimpleNamespace(global_step=0, local_rank=0, max_steps=-1), Module()   # no limit: no projection
    cb2.on_train_start(t2, m2)
    for step in range(1, 4):
        tick(meter2, clock2)
        t2.global_step = step
        cb2.on_train_batch_end(t2, m2, None, None, step - 1)
    assert "projected_energy_kwh" not in m2.logged and "energy_j" in m2.logged


def test_window_value_per_kwh() -> None:
    meter, clock = make_meter(gpu_w=200.0)
    outer = meter.window("epoch")
    meter.add_value(100, unit="samples")             # before the inner window: only the outer gets it
    with meter.measure("batch") as inner:
        tick(meter, clock, 9.0)
        meter.add_value(500, unit="samples")
        inner.add_value(3, unit="checkpoints")       # the window's own value
    tick(meter, clock, 9.0)
    outer.end()
    assert inner.values.totals() == {"samples": 500.0, "checkpoints": 3.0}
    assert outer.values.totals() == {"samples": 600.0}
    # 200 W x 18 s = 3,600 J = 0.001 kWh -> 600,000 samples per kWh.
    assert outer.values.per_kwh(outer.result().total_energy_j) == {"samples": pytest.approx(600_000.0)}


def test_hf_value_from_logged_metrics() -> None:
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter(gpu_w=200.0)
    cb = hf_callback(meter=meter).value_from_logs(eval_accuracy="accuracy", train_samples="samples")
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    for step in range(1, 19):
        tick(meter, clock)
        state.global_step = step
        cb.on_step_end(args, state, control)
    tick(meter, clock)                       # a read past step 18's end: every step is final
    # The eval log is read for its value but gets no figures (evaluation is not training);
    # the next training log carries value per kWh.
    eval_logs = {"eval_accuracy": 0.9, "eval_loss": 0.2}
    cb.on_log(args, state, control, logs=eval_logs)
    assert eval_logs == {"eval_accuracy": 0.9, "eval_loss": 0.2}
    logs = {"train_samples": 7200, "loss": 0.1}
    cb.on_log(args, state, control, logs=logs)
    # 200 W x 18 s = 3,600 J = 0.001 kWh: 900 accuracy-points and 7.2M samples per kWh.
    assert logs["accuracy_per_kwh"] == pytest.approx(900.0)
    assert logs["samples_per_kwh"] == pytest.approx(7_200_000.0)
    assert "loss_per_kwh" not in logs


def test_lightning_value_from_callback_metrics() -> None:
    from wattmeter.callbacks import lightning_callback

    class Module:
        def __init__(self) -> None:
            self.logged: dict = {}

        def log(self, name, value, **kw) -> None:
            self.logged[name] = value

    class Tensor:                                   # torch tensors convert through float()
        def __init__(self, v: float) -> None:
            self.v = v

        def __float__(self) -> float:
            return self.v

    meter, clock = make_meter(gpu_w=100.0)
    cb = lightning_callback(meter=meter).value_from_logs(val_acc="accuracy")
    trainer = SimpleNamespace(global_step=0, local_rank=0, max_steps=-1, callback_metrics={"val_acc": Tensor(0.5)})
    module = Module()
    cb.on_train_start(trainer, module)
    for step in range(1, 38):                # step 37's log counts steps 1-36 (final once read past)
        tick(meter, clock)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    # 100 W x 36 s = 3,600 J = 0.001 kWh -> 0.5 / 0.001 = 500 per kWh.
    assert module.logged["accuracy_per_kwh"] == pytest.approx(500.0)
