"""Rolling per-model figures over recent final requests (p50/p90 J/request and J/token), and
the view the exporter reads. Fed by RequestAccountant (wattmeter.requests)."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .requests import RequestResult

GENERATION = "generation"


@dataclass(frozen=True)
class ModelSummary:
    """Rolling figures over a model's most recent final requests."""

    model: str
    requests: int
    energy_j_p50: float
    energy_j_p90: float
    energy_per_token_j_p50: float | None
    energy_per_token_j_p90: float | None
    generation_tokens: int


@dataclass(frozen=True)
class RequestView:
    """What the exporter reads: per model (final requests, their J), per GPU the idle share,
    and the rolling p50/p90 summary."""

    totals: Mapping[str, tuple[int, float]]
    idle_j: Mapping[str, float]
    summary: Mapping[str, ModelSummary]


class RollingSummary:
    """Per model: monotonic totals (requests, J) and the last ``size`` results. Thread-safe."""

    def __init__(self, size: int = 1000) -> None:
        if size < 1:
            raise ValueError(f"summary_size must be >= 1, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._recent: dict[str, deque["RequestResult"]] = {}
        self._n: dict[str, int] = {}
        self._j: dict[str, float] = {}

    def add(self, results: Sequence["RequestResult"]) -> None:
        with self._lock:
            for r in results:
                self._recent.setdefault(r.model, deque(maxlen=self.size)).append(r)
                self._n[r.model] = self._n.get(r.model, 0) + 1
                self._j[r.model] = self._j.get(r.model, 0.0) + r.energy_j

    @property
    def totals(self) -> dict[str, tuple[int, float]]:
        """Per model: (final requests, their energy in J), both monotonic (Prometheus counters)."""
        with self._lock:
            return {m: (self._n[m], self._j[m]) for m in self._n}

    def summary(self) -> dict[str, ModelSummary]:
        with self._lock:
            recent = {m: list(q) for m, q in self._recent.items()}
        out = {}
        for model, results in sorted(recent.items()):
            energies = sorted(r.energy_j for r in results)
            jpt = sorted(x for r in results if (x := r.energy_per_token_j) is not None)
            out[model] = ModelSummary(model, len(results), quantile(energies, 0.5), quantile(energies, 0.9),
                                      quantile(jpt, 0.5) if jpt else None, quantile(jpt, 0.9) if jpt else None,
                                      sum(r.tokens.get(GENERATION, 0) for r in results))
        return out


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
