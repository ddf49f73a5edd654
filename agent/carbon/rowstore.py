"""Report rows kept as flat typed arrays, so a report over 200k runs holds ~0.3 kB per run instead
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
FLOATS, INTS, OBJS = _FLOATS, _INTS, _OBJS       # the stored order (RowStore.fields)
CHECKPOINT, SIMULATED, NO_CARBON = _CHECKPOINT, _SIMULATED, _NO_CARBON   # bits of the "flags" int
_NF, _NI, _NO = len(_FLOATS), len(_INTS), len(_OBJS)
_FLOAT_AT = {name: k for k, name in enumerate(_FLOATS)}
_INT_AT = {name: k for k, name in enumerate(_INTS)}
_OBJ_AT = {name: k for k, name in enumerate(_OBJS)}


def _opt(x: float) -> float | None:
    return None if x != x else x     # NaN stands for None in the float columns


def decode(floats: Sequence[float], ints: Sequence[int], objs: Sequence[Any]) -> JobRow:
    """One stored row (column order) as a :class:`JobRow`: NaN stands for None (written out
    inline, as :func:`_opt` does: the report's rows are iterated per run)."""
    (dur, gpu, cpu, ram, tot, loc, mkt, emb, water, gpu_h, inten, pue, end_u, kwh, share) = floats
    tokens, prompt, gen, gpus, flags = ints
    run_id, job, host, day, start, status, labels, zone, source, models, end = objs
    if mkt != mkt and emb != emb:       # NaN marks an absent scope; location alone is the common case
        emissions: tuple[tuple[str, float], ...] = (("location", loc),) if loc == loc else ()
    else:
        emissions = tuple(pair for pair in (("location", loc), ("market", mkt), ("embodied", emb))
                          if pair[1] == pair[1])
    figures = Figures(1, dur, (gpu, cpu, ram, tot), emissions, None if water != water else water, tokens, gpu_h,
                      1 if flags & _NO_CARBON else 0)
    return JobRow(run_id, job, host, day, start, status, bool(flags & _CHECKPOINT), labels, zone,
                  None if inten != inten else inten, source, None if pue != pue else pue, prompt, gen, gpus, models,
                  figures, bool(flags & _SIMULATED), None if end_u != end_u else end_u, end,
                  None if kwh != kwh else kwh, None if share != share else share)


class RowStore(Sequence[JobRow]):
    """Rows kept row-major in three flat containers: ``len(FLOATS)`` doubles, ``len(INTS)``
    int64s and ``len(OBJS)`` object references per run. Appending a row is then three C-level
    ``extend`` calls, not 31 Python-level appends (a tenth of a 200k-run report's CPU time was the
    appends); a column is a strided slice."""

    def __init__(self) -> None:
        self._f = array("d")
        self._i = array("q")
        self._o: list[Any] = []
        self._n = 0
        self._columns: dict[str, Sequence[Any]] = {}   # slices made since the last change

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
        self._f.extend(floats)
        self._i.extend(ints)
        self._o.extend(objs)
        self._n += 1
        if self._columns:
            self._columns.clear()

    def __setitem__(self, i: int, row: JobRow | tuple[list[float], list[int], list[Any]]) -> None:
        floats, ints, objs = self._encode(row) if isinstance(row, JobRow) else row
        self._f[i * _NF:(i + 1) * _NF] = array("d", floats)
        self._i[i * _NI:(i + 1) * _NI] = array("q", ints)
        self._o[i * _NO:(i + 1) * _NO] = objs
        self._columns.clear()

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
        return decode(*self.fields(i))

    def __iter__(self) -> Iterator[JobRow]:
        return (self[i] for i in range(self._n))

    def fields(self, i: int) -> tuple[Sequence[float], Sequence[int], Sequence[Any]]:
        """Row ``i`` as stored: its floats, ints and objects in the order of ``FLOATS``, ``INTS``
        and ``OBJS`` (NaN for a float that is None). Renderers format straight from these."""
        return (self._f[i * _NF:(i + 1) * _NF], self._i[i * _NI:(i + 1) * _NI], self._o[i * _NO:(i + 1) * _NO])

    def column(self, name: str) -> Sequence[Any]:
        """One column in storage order (a strided slice, kept until the next change: no row is built)."""
        got = self._columns.get(name)
        if got is None:
            if name in _FLOAT_AT:
                got = self._f[_FLOAT_AT[name]::_NF]
            elif name in _INT_AT:
                got = self._i[_INT_AT[name]::_NI]
            else:
                got = self._o[_OBJ_AT[name]::_NO]
            self._columns[name] = got
        return got

    def figures(self, index: Sequence[int]) -> Figures:
        """The sums of :func:`~wattmeter.carbon.report.combine` over these rows, column by column
        (no row objects built: a 200k-run total is a few sums over arrays)."""
        col = self.column

        def total(name: str) -> float:
            c = col(name)
            return sum([c[i] for i in index])

        def present(name: str) -> list[float]:
            c = col(name)
            return [v for v in (c[i] for i in index) if v == v]     # NaN: the scope is absent

        scopes = tuple((s, sum(vals)) for s in SCOPES if (vals := present(f"{s}_g")))
        water = present("water_l")
        flags = col("flags")
        return Figures(len(index), total("duration_s"),
                       tuple(total(f"{c}_j") for c in (*COMPONENTS, "total")),  # type: ignore[arg-type]
                       scopes, sum(water) if water else None, int(total("tokens")), total("gpu_hours"),
                       sum(1 for i in index if flags[i] & _NO_CARBON))

    def group_keys(self, by: str) -> list[str]:
        """Each row's group for ``--group-by``: job, host, day, or a label key ("(none)" without it)."""
        if by in ("job", "host", "day"):
            return list(self.column(by))
        per_set: dict[Any, str] = {}
        out = []
        for labels in self.column("labels"):
            key = per_set.get(labels)
            if key is None:
                key = per_set[labels] = dict(labels).get(by, "(none)")
            out.append(key)
        return out

    def count(self, flag: str) -> int:
        bit = {"checkpoint": _CHECKPOINT, "simulated": _SIMULATED}[flag]
        return sum(1 for f in self.column("flags") if f & bit)

    def order(self) -> list[int]:
        """Indices by (start, run_id): the report's row order, from the columns alone."""
        keys = list(zip(self.column("start"), self.column("run_id")))
        return sorted(range(self._n), key=keys.__getitem__)     # a C key function: no lambda per run


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
        fields = self.store.fields
        return (decode(*fields(j)) for j in self.index)

    def column(self, name: str) -> Sequence[Any]:
        """A column in this order, without building rows (for table widths)."""
        col = self.store.column(name)
        return [col[j] for j in self.index]

    def fields(self) -> Iterator[tuple[Sequence[float], Sequence[int], Sequence[Any]]]:
        """Each row's stored fields in this order (:meth:`RowStore.fields`)."""
        fields = self.store.fields
        return (fields(j) for j in self.index)

    def group_keys(self, by: str) -> list[str]:
        """Each row's ``--group-by`` key, in this order (:meth:`RowStore.group_keys`)."""
        keys = self.store.group_keys(by)
        return [keys[j] for j in self.index]


def sorted_rows(rows: Sequence[JobRow]) -> SortedRows:
    """``rows`` as a :class:`SortedRows` in the same order: the report's own rows as they are,
    any other sequence of :class:`JobRow` stored first (renderers read stored fields)."""
    if isinstance(rows, SortedRows):
        return rows
    store = RowStore()
    for row in rows:
        store.append(row)
    return SortedRows(store, list(range(len(store))))


__all__: Sequence[str] = ("RowStore", "SortedRows", "sorted_rows", "FLOATS", "INTS", "OBJS")
