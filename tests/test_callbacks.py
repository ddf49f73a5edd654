"""Training callbacks driven through their documented hooks with stand-in trainer objects."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest

from wattmeter.clock import VirtualClock
from wattmeter.meter import Meter
from wattmeter.model import Batch, Component, Device, Reading, Scope, Source


@dataclass
class CounterSensor:
    """Energy counters we set by hand: key -> (component, scope, E(t) in J)."""

    energy: dict[str, tuple[Component, Scope, Callable[[float], float]]]
    name: str = "fake"
    period_s: float = 0.1

    def devices(self) -> list[Device]:
        return [Device(k, c, Source.COUNTER, scope=s) for k, (c, s, _) in self.energy.items()]

    def read(self, now: float) -> Batch:
        return Batch([Reading(k, now, energy_j=f(now)) for k, (_, _, f) in self.energy.items()])

    def close(self) -> None:
        pass


def make_meter(gpu_w: float = 200.0, cpu_host_w: float = 0.0, cpu_proc_w: float = 0.0) -> tuple[Meter, VirtualClock]:
    devices = {"gpu0": (Component.GPU, Scope.HOST, lambda t: gpu_w * t)}
    if cpu_host_w:
        devices["cpu"] = (Component.CPU, Scope.HOST, lambda t: cpu_host_w * t)
    if cpu_proc_w:
        devices["cpu.proc"] = (Component.CPU, Scope.PROCESS, lambda t: cpu_proc_w * t)
    clock = VirtualClock(start=0.0)
    meter = Meter([CounterSensor(devices)], clock=clock)
    meter.poll()
    return meter, clock


def tick(meter: Meter, clock: VirtualClock, seconds: float = 1.0) -> None:
    clock.advance(seconds)
    meter.poll()


def test_importing_callbacks_imports_no_framework():
    code = ("import sys, wattmeter.callbacks as c; "
            "bad = [m for m in ('transformers', 'torch', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- Hugging Face -------------------------------------------------------------------------------
def hf_objects(tokens: int = 0) -> tuple[SimpleNamespace, SimpleNamespace, SimpleNamespace]:
    args = SimpleNamespace(include_num_input_tokens_seen=True, logging_steps=5)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=tokens, is_local_process_zero=True,
                            is_world_process_zero=True, log_history=[])
    control = SimpleNamespace(should_log=False)
    return args, state, control


def test_hf_callback_logs_energy_and_joules_per_token_by_hand():
    from wattmeter.callbacks import WattmeterHFCallback, hf_callback

    meter, clock = make_meter(gpu_w=200.0)
    cb = hf_callback(meter=meter, name="finetune")
    assert isinstance(cb, WattmeterHFCallback)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    for step in range(1, 6):
        tick(meter, clock)
        state.global_step = step
        state.num_input_tokens_seen += 1000
        cb.on_step_end(args, state, control)
    logs = {"loss": 1.5, "learning_rate": 1e-4}
    state.log_history.append({**logs, "step": state.global_step})     # as Trainer.log does
    cb.on_log(args, state, control, logs=logs)
    assert logs["loss"] == 1.5
    assert logs["energy_j"] == pytest.approx(1000.0)                  # 200 W x 5 s
    assert logs["energy_kwh"] == pytest.approx(1000.0 / 3.6e6)
    assert logs["avg_power_w"] == pytest.approx(200.0)
    assert logs["joules_per_token"] == pytest.approx(1000.0 / 5000)
    assert state.log_history[-1]["energy_j"] == pytest.approx(1000.0)
    for step in range(6, 11):
        tick(meter, clock)
        state.global_step = step
        state.num_input_tokens_seen += 1000
        cb.on_step_end(args, state, control)
    cb.on_train_end(args, state, control)
    r = cb.result
    assert r.name == "finetune"
    assert r.total_energy_j == pytest.approx(2000.0)
    assert r.tokens == {"training": 10_000}
    assert r.joules_per_token("training") == pytest.approx(0.2)
    assert meter.tokens == {"training": 10_000}


def test_hf_resumed_run_counts_only_new_tokens_and_no_tokens_means_no_ratio():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter()
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects(tokens=50_000)                 # resumed from a checkpoint
    cb.on_train_begin(args, state, control)
    tick(meter, clock)
    state.num_input_tokens_seen += 300
    cb.on_step_end(args, state, control)
    assert meter.tokens == {"training": 300}

    cb2 = hf_callback(meter=meter)
    args, state, control = hf_objects()
    del state.num_input_tokens_seen                                     # feature off / old transformers
    cb2.on_train_begin(args, state, control)
    tick(meter, clock)
    cb2.on_step_end(args, state, control)
    logs: dict = {}
    cb2.on_log(args, state, control, logs=logs)
    assert "joules_per_token" not in logs and logs["energy_j"] == pytest.approx(200.0)
    cb2.on_log(args, state, control, logs=None)                       # tolerated


def test_hf_log_every_asks_the_trainer_to_log():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter()
    cb = hf_callback(meter=meter, log_every=3)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    asked = []
    for step in range(1, 7):
        control.should_log = False
        state.global_step = step
        cb.on_step_end(args, state, control)
        asked.append(control.should_log)
    assert asked == [False, False, True, False, False, True]
    with pytest.raises(ValueError):
        hf_callback(meter=meter, log_every=0)


def test_hf_only_the_local_main_process_meters():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter()
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    state.is_local_process_zero = False
    cb.on_train_begin(args, state, control)
    tick(meter, clock)
    state.num_input_tokens_seen = 999
    cb.on_step_end(args, state, control)
    logs: dict = {"loss": 1.0}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    assert logs == {"loss": 1.0} and cb.result is None and meter.tokens == {}


def test_hf_energy_prefers_the_process_share_of_the_cpu_like_window_results():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter(gpu_w=100.0, cpu_host_w=80.0, cpu_proc_w=20.0)
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    tick(meter, clock, 2.0)
    logs: dict = {}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    assert logs["energy_j"] == pytest.approx((100 + 20) * 2)
    assert cb.result.total_energy_j == pytest.approx(logs["energy_j"])


def test_hf_install_puts_the_callback_first_once():
    from wattmeter.callbacks import hf_callback

    meter, _ = make_meter()
    cb = hf_callback(meter=meter)
    reporter = object()
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[reporter, cb]))
    assert cb.install(trainer) is cb
    assert trainer.callback_handler.callbacks == [cb, reporter]
    cb.install(trainer)
    assert trainer.callback_handler.callbacks == [cb, reporter]


def test_hf_class_has_every_trainer_event_as_a_noop_without_transformers():
    from wattmeter import callbacks

    cb = callbacks.hf_callback(meter=make_meter()[0])
    args, state, control = hf_objects()
    for event in callbacks._HF_EVENTS:
        if event not in ("on_train_begin", "on_step_end", "on_log", "on_train_end"):
            assert getattr(cb, event)(args, state, control) is None
    assert callbacks.WattmeterHFCallback is type(cb)


# -- Lightning --------------------------------------------------------------------------------
class FakeModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict]] = []

    def log(self, name: str, value: float, **kw: object) -> None:
        self.logged.append((name, value, kw))


def test_lightning_callback_counts_batches_and_logs_by_hand():
    from wattmeter.callbacks import WattmeterLightningCallback, lightning_callback

    meter, clock = make_meter(gpu_w=300.0)
    cb = lightning_callback(meter=meter, log_every=2, tokens_per_batch=lambda b: len(b) * 128)
    assert isinstance(cb, WattmeterLightningCallback)
    trainer = SimpleNamespace(global_step=0, local_rank=0)
    module = FakeModule()
    cb.on_train_start(trainer, module)
    for i in range(8):                         # gradient accumulation: 2 batches per optimizer step
        tick(meter, clock, 0.5)
        if i % 2 == 1:
            trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, ["a", "b", "c", "d"], i)
    steps_logged = [v for k, v, _ in module.logged if k == "energy_j"]
    assert len(steps_logged) == 2              # global steps 2 and 4, each once
    assert steps_logged[-1] == pytest.approx(300.0 * 4.0)
    last = {k: v for k, v, _ in module.logged[-4:]}
    assert last["joules_per_token"] == pytest.approx(1200.0 / (8 * 512))
    assert last["avg_power_w"] == pytest.approx(300.0)
    assert all(kw == {"on_step": True, "on_epoch": False, "rank_zero_only": True} for _, _, kw in module.logged)
    cb.on_train_end(trainer, module)
    assert cb.result.total_energy_j == pytest.approx(1200.0)
    assert cb.result.tokens == {"training": 8 * 512}


def test_lightning_default_logs_every_batch_and_survives_a_module_without_log():
    from wattmeter.callbacks import lightning_callback

    meter, clock = make_meter()
    cb = lightning_callback(meter=meter)
    trainer = SimpleNamespace(global_step=0)
    module = FakeModule()
    cb.on_train_start(trainer, module)
    for i in range(3):
        tick(meter, clock)
        cb.on_train_batch_end(trainer, module, None, None, i)
    assert sum(1 for k, _, _ in module.logged if k == "energy_j") == 3
    cb.on_train_batch_end(trainer, object(), None, None, 3)
    cb.on_exception(trainer, module, RuntimeError("boom"))     # a crashed fit still ends the window
    assert cb.result is not None and cb.result.total_energy_j == pytest.approx(600.0)
    cb.on_train_end(trainer, module)                           # already ended: no error


def test_lightning_other_ranks_do_not_meter():
    from wattmeter.callbacks import lightning_callback

    meter, clock = make_meter()
    cb = lightning_callback(meter=meter, tokens_per_batch=lambda b: 10)
    trainer = SimpleNamespace(global_step=1, local_rank=1)
    module = FakeModule()
    cb.on_train_start(trainer, module)
    tick(meter, clock)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_end(trainer, module)
    assert module.logged == [] and cb.result is None and meter.tokens == {}
