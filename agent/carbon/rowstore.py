"""Report rows kept column by column, so a report over 200k runs holds ~0.3 kB per run instead
of ~1.2 kB of objects (issue 8: <= 200 MB RSS; docs/performance.md).

:class:`RowStore` is the container :func:`~wattmeter.carbon.records.load_records` fills (append,
and replace by index when a later line of the same run supersedes a checkpoint). Reading an item
builds the :class:`~wattmeter.carbon.report.JobRow` on the fly. :class:`SortedRows` is a sorted
view over it: the report's ``rows``.
"""
from __future__ import annotations

import math
from array import array
from typing import Any, Iterator, Sequence, overload

from .report import COMPONENTS, SCOPES, Figures, JobRow

_NAN = float("nan")
_FLOATS = ("duration_s", *(f"{c}_j" for c in (*COMPONENTS, "total")), *(f"{s}_g" for s in SCOPES),
           "water_l", "gpu_hours", "intensity_g_per_kwh", "pue", "end_unix", "energy_kwh_it", "renewable_share")
_INTS = ("tokens", "tokens_prompt", "tokens_generation", "gpu_count", "flags")
_OBJS = ("run_id", "job", "host", "day", "start", "status", "labels", "zone", "intensity_source",
         "gpu_models", "end")
_CHECKPOINT, _SIMULATED, _NO_CARBON = 1, 2, 4


def _opt(x: float) -> float | None:
    return None if x != x else x     # NaN stands for None in the float columns


def decode(floats: Sequence[float], ints: Sequence[int], objs: Sequence[Any]) -> JobRow:
    """One stored row (column order) as a :class:`JobRow`."""
    (dur, gpu, cpu, ram, tot, loc, mkt, emb, water, gpu_h, inten, pue, end_u, kwh, share) = floats
    tokens, prompt, gen, gpus, flags = ints
    run_id, job, host, day, start, status, labels, zone, source, models, end = objs
    emissions = tuple(pair for pair in (("location", loc), ("market", mkt), ("embodied", emb))
                      if pair[1] == pair[1])     # NaN marks an absent scope
    figures = Figures(1, dur, (gpu, cpu, ram, tot), emissions, _opt(water), tokens, gpu_h,
                      1 if flags & _NO_CARBON else 0)
    return JobRow(run_id, job, host, day, start, status, bool(flags & _CHECKPOINT), labels, zone,
                  _opt(inten), source, _opt(pue), prompt, gen, gpus, models, figures,
                  bool(flags & _SIMULATED), _opt(end_u), end, _opt(kwh), _opt(share))


class RowStore(Sequence[JobRow]):
    def __init__(self) -> None:
        self.floats = {name: array("d") for name in _FLOATS}
        self.ints = {name: array("q") for name in _INTS}
        self.objs: dict[str, list[Any]] = {name: [] for name in _OBJS}
        self._fcols = [self.floats[n] for n in _FLOATS]   # positional, for a fast __getitem__
        self._icols = [self.ints[n] for n in _INTS]
        self._ocols = [self.objs[n] for n in _OBJS]
        self._n = 0

    @staticmethod
    def _encode(row: JobRow) -> tuple[list[float], list[int], list[Any]]:
        f = row.figures
        em = dict(f.emissions)
        floats = [f.duration_s, *f.energy, *(em.get(s, _NAN) for s in SCOPES),
                  _NAN if f.water_l is None else f.water_l, f.gpu_hours]
        floats += [_NAN if v is None else v for v in (row.intensity_g_per_kwh, row.pue, row.end_unix,
                                                      row.energy_kwh_it, row.renewable_share)]
        flags = (_CHECKPOINT if row.checkpoint else 0) | (_SIMULATED if row.simulated else 0) \
            | (_NO_CARBON if f.runs_without_carbon else 0)
        ints = [f.tokens, row.tokens_prompt, row.tokens_generation, row.gpu_count, flags]
        objs = [getattr(row, name) for name in _OBJS]
        return floats, ints, objs

    def append(self, row: JobRow | tuple[list[float], list[int], list[Any]]) -> None:
        """Add a row: a :class:`JobRow`, or one already encoded (``report.encode_record``)."""
        floats, ints, objs = self._encode(row) if isinstance(row, JobRow) else row
        for col, v in zip(self._fcols, floats):
            col.append(v)
        for col, v in zip(self._icols, ints):
            col.append(v)
        for col, v in zip(self._ocols, objs):
            col.append(v)
        self._n += 1

    def __setitem__(self, i: int, row: JobRow | tuple[list[float], list[int], list[Any]]) -> None:
        floats, ints, objs = self._encode(row) if isinstance(row, JobRow) else row
        for col, v in zip(self._fcols, floats):
            col[i] = v
        for col, v in zip(self._icols, ints):
            col[i] = v
        for col, v in zip(self._ocols, objs):
            col[i] = v

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> JobRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[JobRow]: ...

    def __getitem__(self, i: int | slice) -> JobRow | list[JobRow]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return decode([col[i] for col in self._fcols], [col[i] for col in self._icols],
                      [col[i] for col in self._ocols])

    def __iter__(self) -> Iterator[JobRow]:
        return (self[i] for i in range(self._n))

    def figures(self, index: Sequence[int]) -> Figures:
        """The sums of :func:`~wattmeter.carbon.report.combine` over these rows, column by column
        (no row objects built: a 200k-run total is a few sums over arrays)."""
        fl, it = self.floats, self.ints

        def total(col: Any) -> float:
            return sum([col[i] for i in index])

        def present(col: Any) -> list[float]:
            return [v for v in (col[i] for i in index) if v == v]     # NaN: the scope is absent

        scopes = tuple((s, sum(vals)) for s in SCOPES if (vals := present(fl[f"{s}_g"])))
        water = present(fl["water_l"])
        flags = it["flags"]
        return Figures(len(index), total(fl["duration_s"]),
                       tuple(total(fl[f"{c}_j"]) for c in (*COMPONENTS, "total")),  # type: ignore[arg-type]
                       scopes, sum(water) if water else None, int(total(it["tokens"])), total(fl["gpu_hours"]),
                       sum(1 for i in index if flags[i] & _NO_CARBON))

    def group_keys(self, by: str) -> list[str]:
        """Each row's group for ``--group-by``: job, host, day, or a label key ("(none)" without it)."""
        if by in ("job", "host", "day"):
            return list(self.objs[by])
        per_set: dict[Any, str] = {}
        out = []
        for labels in self.objs["labels"]:
            key = per_set.get(labels)
            if key is None:
                key = per_set[labels] = dict(labels).get(by, "(none)")
            out.append(key)
        return out

    def count(self, flag: str) -> int:
        bit = {"checkpoint": _CHECKPOINT, "simulated": _SIMULATED}[flag]
        return sum(1 for f in self.ints["flags"] if f & bit)

    def order(self) -> list[int]:
        """Indices by (start, run_id): the report's row order, from the columns alone."""
        start, run_id = self.objs["start"], self.objs["run_id"]
        return sorted(range(self._n), key=lambda i: (start[i], run_id[i]))


class SortedRows(Sequence[JobRow]):
    """A read-only view of a :class:`RowStore` in a given order."""

    def __init__(self, store: RowStore, order: list[int]) -> None:
        self.store, self.index = store, order

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.store[j] for j in self.index[i]]
        return self.store[self.index[i]]

    def __iter__(self) -> Iterator[JobRow]:
        return (self.store[j] for j in self.index)

    def column(self, name: str) -> Sequence[Any]:
        """A text column in this order, without building rows (for table widths)."""
        col = self.store.objs[name]
        return [col[j] for j in self.index]


__all__: Sequence[str] = ("RowStore", "SortedRows")
