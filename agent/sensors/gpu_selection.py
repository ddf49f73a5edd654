"""Which GPUs a job may meter: CUDA_VISIBLE_DEVICES entries (indices, UUIDs, MIG ids) matched
against NVML's GPUs, the way CUDA itself reads them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


@dataclass
class GpuSelection:
    """Which GPUs to meter: CUDA_VISIBLE_DEVICES entries (indices, UUIDs, MIG ids) or all."""

    entries: list[str] | None = None   # None = every GPU

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "GpuSelection":
        raw = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
        if raw is None:
            return cls(None)
        return cls([e.strip() for e in raw.split(",") if e.strip()])

    def match(self, gpus: Sequence[tuple[int, str]]) -> list[tuple[int, str | None]]:
        """Map entries to (nvml index, MIG id or None). ``gpus`` is [(index, uuid)]."""
        if self.entries is None:
            return [(i, None) for i, _ in gpus]
        chosen: list[tuple[int, str | None]] = []
        for entry in self.entries:
            hit = self._match_one(entry, gpus)
            if hit is None:
                break   # CUDA stops at the first invalid entry, and so do we
            if hit not in chosen:
                chosen.append(hit)
        return chosen

    @staticmethod
    def _match_one(entry: str, gpus: Sequence[tuple[int, str]]) -> tuple[int, str | None] | None:
        if entry.lstrip("-").isdigit():
            idx = int(entry)
            return (idx, None) if any(i == idx for i, _ in gpus) and idx >= 0 else None
        mig = None
        if entry.startswith("MIG-"):
            mig = entry
            rest = entry[4:]
            # MIG-GPU-<uuid>/<gi>/<ci> (older drivers) names the parent; MIG-<uuid> does not.
            parent = rest.split("/")[0]
            if not parent.startswith("GPU-"):
                return None if len(gpus) != 1 else (gpus[0][0], mig)
            entry = parent
        prefix = entry if entry.startswith("GPU-") else f"GPU-{entry}"
        hits = [i for i, uuid in gpus if uuid.startswith(prefix)]
        return (hits[0], mig) if len(hits) == 1 else None
