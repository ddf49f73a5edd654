"""The training callbacks inside the real ``transformers.Trainer`` and ``lightning.Trainer`` on the
CPU: tiny models built from configs (no hub downloads), a simulated GPU, real loggers on disk."""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import pytest

from wattmeter.discovery import SensorPlan, discover
from wattmeter.meter import Meter

torch = pytest.importorskip("torch")

FIELDS = ("energy_j", "energy_kwh", "avg_power_w", "interval_energy_j", "interval_tokens", "interval_steps")
SETTLED_FIELDS = ("joules_per_token", "interval_joules_per_token", "step_energy_j", "step_joules_per_token")


@pytest.fixture
def meter():
    """A started meter on one simulated H100 (the fake NVML), no CPU/RAM: GPU energy only."""
    found = discover(SensorPlan(fake_gpus=1, cpu="none", ram="none", gpu_period_s=0.05))
    m = Meter(found.sensors, notes=found.notes).start()
    yield m
    m.close()


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# -- transformers ------------------------------------------------------------------------------
def _hf_trainer(tmp_path: Path, callbacks: list, report_to: list[str]):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)          # a step longer than the GPU sampling period, as on a real GPU
        return forward(*args, **kwargs)

    model.forward = slow_forward

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict:
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=2, logging_steps=2,
        eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=4, save_strategy="no",
        report_to=report_to, include_num_input_tokens_seen=True,
        use_cpu=True, disable_tqdm=True, learning_rate=1e-3, remove_unused_columns=False)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(),
                                callbacks=callbacks)


def test_hf_plain_callbacks_list_reaches_tensorboard_and_the_final_state(tmp_path: Path, meter, caplog) -> None:
    pytest.importorskip("tensorboard")
    from wattmeter.callbacks import hf_callback

    cb = hf_callback(meter=meter, name="finetune")
    trainer = _hf_trainer(tmp_path, [cb], ["tensorboard"])
    with caplog.at_level(logging.WARNING, logger="wattmeter.callbacks"):
        trainer.train()
    trainer.save_state()
    result = cb.result
    assert result is not None and result.simulated
    assert result.tokens == {"training": 8 * 2 * 16}
    assert any("SIMULATED" in r.getMessage() for r in caplog.records)

    # The final log and trainer_state.json carry the exact window result, not a running figure.
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    final = state["log_history"][-1]
    assert "train_runtime" in final
    assert final["energy_j"] == result.total_energy_j > 0
    assert final["joules_per_token"] == result.joules_per_token("training")

    train_logs = [h for h in state["log_history"] if "loss" in h]
    eval_logs = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6, 8] and len(eval_logs) == 2
    assert all(not any(k in h for k in FIELDS + SETTLED_FIELDS) for h in eval_logs)
    for h in train_logs:
        assert set(FIELDS) <= set(h), h
        # A log counts the steps final by then (read past their end, ~0.1 s): 2 x 16 tokens each.
        assert h["interval_tokens"] == h["interval_steps"] * 2 * 16, h
        if h["interval_steps"]:
            assert set(SETTLED_FIELDS) <= set(h), h
    assert any(h["interval_steps"] for h in train_logs)
    # Cumulative figures are sums of final steps: they never go back.
    assert [h["energy_j"] for h in train_logs] == sorted(h["energy_j"] for h in train_logs)

    # Conservation: every step is a request, and the intervals of all logs (the final one closes
    # the last) sum to the final cumulative figures, which are the window's exact result.
    every = [*train_logs, final]
    assert sum(h["interval_steps"] for h in every) == 8
    assert sum(h["interval_tokens"] for h in every) == result.tokens["training"]
    assert sum(h["interval_energy_j"] for h in every) == pytest.approx(final["energy_j"], rel=1e-9)
    # The step requests alone account for the window: the last interval's reconciliation (the
    # window pinned its edges before the ledger's last re-dating of a counter step) is small.
    assert abs(cb.tracker.reconciled_j) <= 1e-2 * result.total_energy_j
    for before, h in zip([{"energy_j": 0.0}, *train_logs], train_logs):
        assert h["energy_j"] - before["energy_j"] == pytest.approx(h["interval_energy_j"], rel=1e-9, abs=1e-9)

    # TensorBoard got the fields in the same log calls (the callback put itself first).
    scalars = _scalars(tmp_path / "out")                   # TensorBoard's default: output_dir/runs/...
    for name in ("energy_j", "interval_energy_j", "interval_steps"):
        assert [s for s, _ in scalars[f"train/{name}"]][:4] == [2, 4, 6, 8], name
    for name in ("joules_per_token", "interval_joules_per_token", "step_energy_j"):
        assert scalars[f"train/{name}"], name
    assert "eval/energy_j" not in scalars
    assert scalars["train/energy_j"][-1][1] == pytest.approx(result.total_energy_j, rel=1e-6)


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``run-*.wandb`` file: a 7-byte header,
    then LevelDB log framing (32 KiB blocks; per chunk a CRC, a length and a full/first/middle/last
    type) around protobuf ``Record`` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, part, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                        # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and part:         # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json)
                             for it in record.history.item})
    return rows


def test_hf_fields_reach_the_wandb_history_offline(tmp_path: Path, meter, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from wattmeter.callbacks import hf_callback

    monkeypatch.setenv("WANDB_MODE", "offline")            # nothing leaves the machine
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))   # nothing written outside tmp_path
    monkeypatch.setenv("WANDB_PROJECT", "wattmeter-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cb = hf_callback(meter=meter)
    trainer = _hf_trainer(tmp_path, [cb], ["wandb"])
    try:
        trainer.train()
    finally:
        wandb.finish()
        wandb.teardown()                                   # stop the W&B service: the run file is complete
    result = cb.result
    assert result is not None

    run_files = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    rows = _wandb_history(run_files[0])
    train = [r for r in rows if "train/energy_j" in r]
    assert [r["train/global_step"] for r in train] == [2, 4, 6, 8, 8]      # four step logs, then the summary
    assert not any("eval/energy_j" in r for r in rows)
    assert train[-1]["train/energy_j"] == pytest.approx(result.total_energy_j, rel=1e-12)
    assert train[-1]["train/joules_per_token"] == pytest.approx(result.joules_per_token("training"), rel=1e-12)
    # The per-step accounting reached W&B too, and its intervals add up to the run.
    assert sum(r["train/interval_steps"] for r in train) == 8
    assert sum(r["train/interval_energy_j"] for r in train) == pytest.approx(result.total_energy_j, rel=1e-9)
    assert any("train/interval_joules_per_token" in r and "train/step_energy_j" in r for r in train)


# -- Lightning ---------------------------------------------------------------------------------
def test_lightning_fit_logs_to_csv_and_tensorboard_and_ends_exact(tmp_path: Path, meter) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from torch.utils.data import DataLoader, TensorDataset

    from wattmeter.callbacks import lightning_callback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.03)                         # longer than the GPU sampling period
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    cb = lightning_callback(meter=meter, tokens_per_batch=lambda b: b[0].shape[0] * 8)
    loggers = [pl.loggers.CSVLogger(tmp_path, name="csv"), pl.loggers.TensorBoardLogger(tmp_path, name="tb")]
    trainer = pl.Trainer(max_steps=12, log_every_n_steps=3, logger=loggers, callbacks=[cb], accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    result = cb.result
    assert result is not None and result.tokens == {"training": 12 * 4 * 8}
    exact = result.total_energy_j
    assert exact > 0
    assert trainer.logged_metrics["energy_j"] == pytest.approx(exact, rel=1e-6)   # stored as float32 tensors
    assert trainer.logged_metrics["joules_per_token"] == pytest.approx(exact / (12 * 32), rel=1e-6)

    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    energy_rows = [(int(r["step"]), float(r["energy_j"])) for r in rows if r.get("energy_j")]
    steps = [s for s, _ in energy_rows]
    assert steps[:-1] and all(s % 3 == 2 for s in steps[:-1])   # Lightning's 0-based log steps 2, 5, 8, 11
    assert len(set(steps[:-1])) == len(steps[:-1])               # each once: no stale rewrites
    assert steps[-1] == 12 and energy_rows[-1][1] == pytest.approx(exact, rel=1e-6)
    values = [v for _, v in energy_rows]
    assert values == sorted(values)
    # Conservation: each optimizer step is a request; the logged intervals (the final write closes
    # the last) sum to the exact total, steps and tokens included. Lightning logs float32.
    intervals = [r for r in rows if r.get("interval_energy_j")]
    assert len(intervals) == len(energy_rows)
    assert sum(float(r["interval_steps"]) for r in intervals) == 12
    assert sum(float(r["interval_tokens"]) for r in intervals) == 12 * 32
    assert sum(float(r["interval_energy_j"]) for r in intervals) == pytest.approx(exact, rel=1e-5)
    scalars = _scalars(tmp_path / "tb")
    assert scalars["energy_j"][-1] == (12, pytest.approx(exact, rel=1e-6))
    assert "interval_joules_per_token" in scalars and "step_joules_per_token" in scalars
