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
    simulated: bool = False

    def devices(self) -> list[Device]:
        return [Device(k, c, Source.COUNTER, scope=s, simulated=self.simulated and c == Component.GPU)
                for k, (c, s, _) in self.energy.items()]

    def read(self, now: float) -> Batch:
        return Batch([Reading(k, now, energy_j=f(now)) for k, (_, _, f) in self.energy.items()])

    def close(self) -> None:
        pass


def make_meter(gpu_w: float | None = 200.0, cpu_host_w: float = 0.0, cpu_proc_w: float = 0.0,
               simulated: bool = False) -> tuple[Meter, VirtualClock]:
    devices: dict[str, tuple[Component, Scope, Callable[[float], float]]] = {}
    if gpu_w is not None:
        devices["gpu0"] = (Component.GPU, Scope.HOST, lambda t: gpu_w * t)
    if cpu_host_w:
        devices["cpu"] = (Component.CPU, Scope.HOST, lambda t: cpu_host_w * t)
    if cpu_proc_w:
        devices["cpu.proc"] = (Component.CPU, Scope.PROCESS, lambda t: cpu_proc_w * t)
    clock = VirtualClock(start=0.0)
    meter = Meter([CounterSensor(devices, simulated=simulated)], clock=clock)
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
    # Steps 1-4 are final; step 5 ended at the last reading, which the ledger may still revise
    # for one refresh period (0.1 s), so it waits for the next log.
    assert logs["interval_steps"] == 4
    assert logs["energy_j"] == pytest.approx(800.0)                   # 200 W x 4 s
    assert logs["energy_kwh"] == pytest.approx(800.0 / 3.6e6)
    assert logs["avg_power_w"] == pytest.approx(200.0)
    assert logs["joules_per_token"] == pytest.approx(800.0 / 4000)
    assert state.log_history[-1]["energy_j"] == pytest.approx(800.0)
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
    tick(meter, clock)                                                 # a read past the step's end
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
    state.global_step = 1
    cb.on_step_end(args, state, control)
    tick(meter, clock, 1.0)
    logs: dict = {}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    assert logs["energy_j"] == pytest.approx((100 + 20) * 2)          # step 1: GPU + the process's CPU
    assert cb.result.total_energy_j == pytest.approx((100 + 20) * 3)
    assert cb.tracker.total.energy_j == pytest.approx(cb.result.total_energy_j)   # step 1 + the tail


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


def test_hf_class_answers_every_trainer_event_as_trainer_calls_it():
    from wattmeter import callbacks

    cb = callbacks.hf_callback(meter=make_meter()[0])
    args, state, control = hf_objects()
    # CallbackHandler.call_event passes these keywords to every event (metrics for evaluate/predict).
    kw = dict(model=None, processing_class=None, optimizer=None, lr_scheduler=None,
              train_dataloader=None, eval_dataloader=None)
    for event in callbacks._HF_EVENTS:
        if event not in ("on_train_begin", "on_step_end", "on_log", "on_train_end"):
            extra = {"metrics": {}} if event in ("on_evaluate", "on_predict") else {}
            assert getattr(cb, event)(args, state, control, **kw, **extra) is None
    assert callbacks.WattmeterHFCallback is type(cb)


def test_hf_logs_carry_interval_and_step_figures_beside_the_cumulative_ones():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter(gpu_w=100.0)
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    logs_seen = []
    for step, (seconds, tokens) in enumerate([(1, 100), (1, 100), (2, 50), (3, 300)], start=1):
        cb.on_step_begin(args, state, control)
        tick(meter, clock, seconds)
        state.global_step = step
        state.num_input_tokens_seen += tokens
        cb.on_step_end(args, state, control)
        if step % 2 == 0:                              # logging_steps=2
            logs = {"loss": 1.0}
            state.log_history.append({**logs, "step": step})
            cb.on_log(args, state, control, logs=logs)
            logs_seen.append(logs)
    first, second = logs_seen
    # A log counts the steps final by then: the one ending at the last reading waits a log.
    assert first["interval_steps"] == 1
    assert first["interval_energy_j"] == pytest.approx(100.0) and first["interval_tokens"] == 100
    assert second["interval_steps"] == 2                                    # steps 2 and 3
    assert second["interval_energy_j"] == pytest.approx(300.0) and second["interval_tokens"] == 150
    assert second["interval_joules_per_token"] == pytest.approx(300.0 / 150)
    assert second["interval_avg_power_w"] == pytest.approx(100.0)
    assert second["joules_per_token"] == pytest.approx(400.0 / 250)          # cumulative, steps 1-3
    assert second["step_energy_j"] == pytest.approx(200.0) and second["step_tokens"] == 50   # step 3
    assert second["step_joules_per_token"] == pytest.approx(4.0)
    assert state.log_history[-1]["interval_joules_per_token"] == pytest.approx(2.0)
    state.max_steps = 4
    cb.on_epoch_end(args, state, control)
    final = {"train_runtime": 7.0, "train_loss": 1.0}
    cb.on_log(args, state, control, logs=final)
    assert final["interval_steps"] == 1 and final["interval_energy_j"] == pytest.approx(300.0)   # step 4
    assert final["step_joules_per_token"] == pytest.approx(1.0)
    # Conservation: the intervals of all logs sum to the final cumulative figures (the window).
    every = [*logs_seen, final]
    assert sum(h["interval_energy_j"] for h in every) == pytest.approx(final["energy_j"], rel=1e-12)
    assert final["energy_j"] == pytest.approx(100.0 * 7)
    assert sum(h["interval_tokens"] for h in every) == cb.result.tokens["training"] == 550
    assert sum(h["interval_steps"] for h in every) == 4


def test_hf_eval_logs_get_no_energy_fields():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter()
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    tick(meter, clock)
    state.global_step = 1
    cb.on_step_end(args, state, control)
    tick(meter, clock)
    cb.on_prediction_step(args, state, control)          # evaluation loop, any metric prefix
    logs = {"val_loss": 0.5, "val_runtime": 0.1}
    cb.on_log(args, state, control, logs=logs)
    cb.on_evaluate(args, state, control, metrics=logs)
    assert logs == {"val_loss": 0.5, "val_runtime": 0.1}
    eval_logs = {"eval_loss": 0.5}                        # the default prefix, even without steps
    cb.on_log(args, state, control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 0.5}
    train_logs = {"loss": 1.0}
    cb.on_log(args, state, control, logs=train_logs)
    assert train_logs["energy_j"] == pytest.approx(200.0)


def test_hf_final_log_carries_the_exact_result_into_logs_and_history():
    from wattmeter.callbacks import hf_callback

    meter, clock = make_meter(gpu_w=250.0)
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    cb.on_train_begin(args, state, control)
    for step in range(1, 4):
        tick(meter, clock)
        state.global_step = step
        state.num_input_tokens_seen += 500
        cb.on_step_end(args, state, control)
    step_log = {"loss": 1.1, "train_runtime": 2.9}          # step logs carry speed metrics too
    cb.on_log(args, state, control, logs=step_log)
    assert cb.result is None and "interval_energy_j" in step_log
    state.max_steps = 3
    cb.on_epoch_end(args, state, control)                   # the loop is over
    final = {"train_runtime": 3.0, "train_loss": 1.2}
    state.log_history.append({**final, "step": 3})
    cb.on_log(args, state, control, logs=final)
    assert cb.result is not None
    assert final["energy_j"] == cb.result.total_energy_j == pytest.approx(750.0)
    assert final["joules_per_token"] == cb.result.joules_per_token("training") == pytest.approx(0.5)
    assert state.log_history[-1]["energy_j"] == cb.result.total_energy_j
    # The final log also closes the last interval (step 3; steps 1-2 were in the step log).
    assert step_log["interval_energy_j"] == pytest.approx(500.0)
    assert final["interval_energy_j"] == pytest.approx(250.0) and final["interval_tokens"] == 500
    assert step_log["interval_energy_j"] + final["interval_energy_j"] == pytest.approx(final["energy_j"])
    cb.on_train_end(args, state, control)                   # already ended: the result stays
    assert cb.result.total_energy_j == final["energy_j"]


@pytest.mark.parametrize("gpu_w, simulated, expected", [
    (200.0, True, "the 1 GPU(s) are SIMULATED (fake NVML)"),
    (None, False, "no GPU is metered"),
    (200.0, False, None),
])
def test_the_log_says_when_gpus_are_simulated_or_absent(caplog, gpu_w, simulated, expected):
    from wattmeter.callbacks import hf_callback

    meter, _ = make_meter(gpu_w=gpu_w, cpu_host_w=50.0, simulated=simulated)
    cb = hf_callback(meter=meter)
    args, state, control = hf_objects()
    with caplog.at_level("WARNING", logger="wattmeter.callbacks"):
        cb.on_train_begin(args, state, control)
    messages = [r.getMessage() for r in caplog.records if r.name == "wattmeter.callbacks"]
    if expected is None:
        assert messages == [] and cb.tracker.notice is None
    else:
        assert len(messages) == 1 and expected in messages[0] and cb.tracker.notice == messages[0]


# -- Lightning --------------------------------------------------------------------------------
class FakeModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict]] = []

    def log(self, name: str, value: float, **kw: object) -> None:
        self.logged.append((name, value, kw))


class FakeLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []
        self.saved = 0

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def save(self) -> None:
        self.saved += 1


def test_lightning_logs_once_per_optimizer_step_on_the_trainers_log_steps():
    from wattmeter.callbacks import WattmeterLightningCallback, lightning_callback

    meter, clock = make_meter(gpu_w=300.0)
    cb = lightning_callback(meter=meter, tokens_per_batch=lambda b: len(b) * 128)
    assert isinstance(cb, WattmeterLightningCallback)
    trainer = SimpleNamespace(global_step=0, local_rank=0, log_every_n_steps=2, loggers=[], logged_metrics={})
    module = FakeModule()
    cb.on_train_start(trainer, module)
    for i in range(8):                         # gradient accumulation: 2 batches per optimizer step
        tick(meter, clock, 0.5)
        if i % 2 == 1:
            trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, ["a", "b", "c", "d"], i)
    # Global steps 2 and 4, each once; each counts the steps final by then (not the one that
    # ended at the last reading): step 1, then steps 2 and 3.
    energy = [v for k, v, _ in module.logged if k == "energy_j"]
    assert energy == [pytest.approx(300.0), pytest.approx(900.0)]
    last = {k: v for k, v, _ in module.logged if k.startswith(("joules", "interval_", "step_"))}
    assert last["joules_per_token"] == pytest.approx(900.0 / (6 * 512))
    assert last["interval_energy_j"] == pytest.approx(600.0) and last["interval_tokens"] == 4 * 512
    assert last["interval_steps"] == 2
    assert last["step_energy_j"] == pytest.approx(300.0) and last["step_tokens"] == 2 * 512
    assert all(kw == {"on_step": True, "on_epoch": False, "rank_zero_only": True} for _, _, kw in module.logged)


def test_lightning_does_not_write_stale_figures_again():
    from wattmeter.callbacks import lightning_callback

    meter, clock = make_meter()
    cb = lightning_callback(meter=meter, log_every=1)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50)
    module = FakeModule()
    cb.on_train_start(trainer, module)
    for i in range(6):
        if i in (0, 3, 5):                      # the ledger moves only before steps 1, 4 and 6
            tick(meter, clock)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, None, i)
    # Step 4 logs steps 1-3 (final once read past t=1); step 6 logs steps 4-5. Steps 2, 3 and 5
    # bring no newly final step and are not written.
    assert [v for k, v, _ in module.logged if k == "energy_j"] == [pytest.approx(200.0), pytest.approx(400.0)]
    assert [v for k, v, _ in module.logged if k == "interval_steps"] == [3, 2]


def test_lightning_end_writes_the_exact_result_to_every_logger_and_logged_metrics():
    from wattmeter.callbacks import lightning_callback

    meter, clock = make_meter(gpu_w=150.0)
    cb = lightning_callback(meter=meter, tokens_per_batch=lambda b: 10)
    csv, tb = FakeLogger(), FakeLogger()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=50, loggers=[csv, tb],
                              logged_metrics={"energy_j": 1.0, "train_loss": 0.3})
    module = FakeModule()
    cb.on_train_start(trainer, module)
    for i in range(4):
        tick(meter, clock)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, None, i)
    cb.on_train_end(trainer, module)
    exact = cb.result.total_energy_j
    assert exact == pytest.approx(600.0)
    assert trainer.logged_metrics["energy_j"] == exact and trainer.logged_metrics["train_loss"] == 0.3
    assert trainer.logged_metrics["joules_per_token"] == pytest.approx(600.0 / 40)
    for lg in (csv, tb):
        assert lg.rows[-1][0] == 4 and lg.rows[-1][1]["energy_j"] == exact and lg.saved == 1


def test_lightning_survives_a_module_without_log_and_a_crash_ends_the_window():
    from wattmeter.callbacks import lightning_callback

    meter, clock = make_meter()
    cb = lightning_callback(meter=meter)
    trainer = SimpleNamespace(global_step=0)
    cb.on_train_start(trainer, object())
    for i in range(3):
        tick(meter, clock)
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, object(), None, None, i)
    cb.on_exception(trainer, object(), RuntimeError("boom"))     # a crashed fit still ends the window
    assert cb.result is not None and cb.result.total_energy_j == pytest.approx(600.0)
    cb.on_train_end(trainer, object())                           # already ended: no error


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
