"""Host facts the CPU and RAM models need: CPU model and topology, the CPUs this process may
use (affinity and cgroup quota), the cgroup memory limit, and the CPU TDP table.

Every path is injectable (``HostProbe(proc=..., cgroup_root=...)``) so tests point at
checked-in fake trees, as prometheus_client's ``ProcessCollector(proc=...)`` does.
Reads happen at sensor construction only, never per sample.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

# cgroup v1 spells "no limit" as LONG_MAX rounded down to a page (9223372036854771712).
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CpuTopology:
    """The CPU as this OS sees it (in a VM: the virtual topology)."""

    model_name: str | None
    vendor: str | None
    sockets: int
    cores_per_socket: int | None
    threads_per_core: int
    logical_cpus: int


@dataclass(frozen=True)
class TdpSpec:
    """One row of data/cpu_tdp.json: the vendor TDP of one socket and its physical cores."""

    match: str
    tdp_w: float
    cores: int


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup CPU bandwidth limit: ``cpus`` CPUs' worth of time, set in ``cgroup_dir``."""

    cpus: float
    cgroup_dir: str
    version: int


@dataclass
class HostProbe:
    proc: str = "/proc"
    cgroup_root: str = "/sys/fs/cgroup"
    affinity: Callable[[], set[int]] | None = None  # default: os.sched_getaffinity(0)

    # -- CPU -------------------------------------------------------------------------------
    def topology(self) -> CpuTopology:
        text = _read(os.path.join(self.proc, "cpuinfo")) or ""
        blocks = [b for b in text.split("\n\n") if "processor" in b]
        fields = [_kv(b) for b in blocks]
        first = fields[0] if fields else {}
        logical = len(fields) or os.cpu_count() or 1
        sockets = len({f.get("physical id", "0") for f in fields}) or 1
        cores = _int(first.get("cpu cores"))
        siblings = _int(first.get("siblings"))
        if cores is None and fields:
            pairs = {(f.get("physical id", "0"), f.get("core id")) for f in fields if "core id" in f}
            cores = len(pairs) // sockets if pairs else None
        tpc = 1
        if cores and siblings and siblings >= cores:
            tpc = max(1, siblings // cores)
        return CpuTopology(
            model_name=first.get("model name"),
            vendor=first.get("vendor_id"),
            sockets=sockets,
            cores_per_socket=cores,
            threads_per_core=tpc,
            logical_cpus=logical,
        )

    def affinity_cpus(self) -> set[int]:
        if self.affinity is not None:
            return set(self.affinity())
        if hasattr(os, "sched_getaffinity"):
            return set(os.sched_getaffinity(0))
        return set(range(os.cpu_count() or 1))

    def cpu_quota(self) -> CpuQuota | None:
        """The tightest CPU bandwidth limit on this process's cgroup or any ancestor."""
        best: CpuQuota | None = None
        if self._is_v2():
            for d in self._chain(""):
                parts = (_read(os.path.join(d, "cpu.max")) or "").split()
                if len(parts) == 2 and parts[0] != "max":
                    q = CpuQuota(int(parts[0]) / int(parts[1]), d, 2)
                    best = q if best is None or q.cpus < best.cpus else best
            return best
        for d in self._chain("cpu"):
            quota = _int(_read(os.path.join(d, "cpu.cfs_quota_us")))
            period = _int(_read(os.path.join(d, "cpu.cfs_period_us")))
            if quota is not None and quota > 0 and period:
                q = CpuQuota(quota / period, d, 1)
                best = q if best is None or q.cpus < best.cpus else best
        return best

    def cgroup_cpu_usage_s(self, quota: CpuQuota) -> float | None:
        """CPU seconds used by the cgroup that carries ``quota`` (None if unreadable)."""
        if quota.version == 2:
            for line in (_read(os.path.join(quota.cgroup_dir, "cpu.stat")) or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return None
        ns = _int(_read(os.path.join(quota.cgroup_dir, "cpuacct.usage")))  # co-mounted cpu,cpuacct
        return ns / 1e9 if ns is not None else None

    # -- memory ----------------------------------------------------------------------------
    def memory_limit_bytes(self) -> int | None:
        """The tightest cgroup memory limit on this process's cgroup or its ancestors."""
        limits: list[int] = []
        if self._is_v2():
            for d in self._chain(""):
                v = _int(_read(os.path.join(d, "memory.max")))  # "max" parses to None
                if v is not None:
                    limits.append(v)
        else:
            for d in self._chain("memory"):
                v = _int(_read(os.path.join(d, "memory.limit_in_bytes")))
                if v is not None and v < _V1_UNLIMITED:
                    limits.append(v)
        return min(limits) if limits else None

    # -- cgroup paths ----------------------------------------------------------------------
    def _is_v2(self) -> bool:
        return os.path.exists(os.path.join(self.cgroup_root, "cgroup.controllers"))

    def _chain(self, controller: str) -> list[str]:
        """This process's cgroup directory and its ancestors up to the mount, deepest first.

        In a container the cgroup namespace makes /proc/self/cgroup say "/" or a host path
        that is not mounted; then the mount root itself is the container's cgroup.
        """
        if controller:  # v1: a mount per controller, maybe co-mounted ("cpu,cpuacct")
            mounts = [os.path.join(self.cgroup_root, m) for m in (controller, f"{controller},cpuacct", f"cpuacct,{controller}")]
            mount = next((m for m in mounts if os.path.isdir(m)), None)
            if mount is None:
                return []
        else:
            mount = self.cgroup_root
        rel = self._own_path(controller).strip("/")
        chain: list[str] = []
        parts = rel.split("/") if rel else []
        while parts:
            d = os.path.join(mount, *parts)
            if os.path.isdir(d):
                chain.append(d)
            parts.pop()
        chain.append(mount)
        return chain

    def _own_path(self, controller: str) -> str:
        for line in (_read(os.path.join(self.proc, "self", "cgroup")) or "").splitlines():
            hid, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            if controller == "" and hid == "0" and ctrls == "":
                return path
            if controller and controller in ctrls.split(","):
                return path
        return "/"


def visible_cpus(n_affinity: int, quota: CpuQuota | None) -> tuple[float, str]:
    """How many CPUs' worth of time this process can use, and why (for ``doctor``)."""
    if quota is not None and quota.cpus < n_affinity:
        return quota.cpus, f"cgroup v{quota.version} CPU quota of {quota.cpus:g} CPUs"
    return float(n_affinity), f"{n_affinity} CPUs in the affinity mask"


# -- TDP table -------------------------------------------------------------------------------
def normalize_model_name(name: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz' -> 'Intel Xeon Platinum 8380 CPU @ 2.30GHz'."""
    name = re.sub(r"\((R|TM|r|tm)\)", "", name)
    return " ".join(name.split())


def lookup_tdp(model_name: str | None, table: Sequence[TdpSpec] | None = None) -> TdpSpec | None:
    """The table row whose ``match`` occurs in the model name as whole words; longest wins,
    so 'Platinum 8380' never matches an 8380H and 'EPYC 7543' never matches a 7543P."""
    if not model_name:
        return None
    name = normalize_model_name(model_name).lower()
    best: TdpSpec | None = None
    for spec in table if table is not None else load_tdp_table():
        if _has_word(name, spec.match.lower()) and (best is None or len(spec.match) > len(best.match)):
            best = spec
    return best


def _has_word(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` with no letter or digit glued to either end."""
    i = text.find(word)
    while i >= 0:
        before = text[i - 1] if i > 0 else " "
        after = text[i + len(word)] if i + len(word) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return True
        i = text.find(word, i + 1)
    return False


@lru_cache(maxsize=1)
def load_tdp_table() -> tuple[TdpSpec, ...]:
    """Rows of data/cpu_tdp.json (cached: an immutable data file, not state)."""
    raw = resources.files("wattmeter").joinpath("data", "cpu_tdp.json").read_text(encoding="utf-8")
    return tuple(TdpSpec(r["match"], float(r["tdp_w"]), int(r["cores"])) for r in json.loads(raw)["cpus"])


# -- small parsers ---------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None  # absent files are the normal case here (no cgroup limit, other cgroup version)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _kv(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out
