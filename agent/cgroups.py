"""PID -> container and pod, from ``/proc/PID/cgroup``.

NVML reports host PIDs, so a node agent can find each GPU process's cgroup and from its path
the container id (docker, containerd, cri-o, podman) and the Kubernetes pod UID, under cgroup
v1 and v2, with the cgroupfs or the systemd driver. Pod name and namespace come from the pod
UID through the kubelet's ``/var/log/pods/<namespace>_<pod>_<uid>`` folders (mount it
read-only into the DaemonSet), or, for a sidecar, from the Downward API environment
(``POD_NAME``, ``POD_NAMESPACE``, ``POD_UID``). All roots are injectable for tests.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

_HEX64 = re.compile(r"[0-9a-f]{64}")
# systemd slices write the pod UID with underscores; cgroupfs with dashes; static pods use a hash.
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"
                      r"(?:\.slice)?(?:/|:|$)")
# Runtime prefixes on the container's own path component.
_RUNTIMES = (("cri-containerd", "containerd"), ("containerd", "containerd"), ("crio", "cri-o"),
             ("docker", "docker"), ("libpod", "podman"))


@dataclass(frozen=True)
class ContainerInfo:
    """Where a process runs. Empty strings mean "not in a container" or "not resolvable"."""

    container_id: str = ""
    runtime: str = ""
    pod_uid: str = ""
    pod: str = ""
    namespace: str = ""


HOST = ContainerInfo()


def _runtime_of(component: str, parent: str) -> str:
    for prefix, runtime in _RUNTIMES:
        if component.startswith(prefix + "-") or f":{prefix}:" in component:
            return runtime
    if parent == "docker":
        return "docker"
    if parent in ("k8s.io", "moby"):    # containerd namespace (cgroupfs driver), moby = dockerd
        return "containerd" if parent == "k8s.io" else "docker"
    if parent.startswith("crio"):
        return "cri-o"
    return ""


def _from_path(path: str) -> tuple[str, str, str]:
    """(container_id, runtime, pod_uid) from one cgroup path."""
    parts = [p for p in path.split("/") if p]
    container_id = runtime = ""
    for i in range(len(parts) - 1, -1, -1):
        comp = parts[i]
        if "conmon" in comp:        # cri-o's monitor process, not the container itself
            return "", "", ""
        found = _HEX64.findall(comp)
        if found:
            container_id = found[-1]
            runtime = _runtime_of(comp, parts[i - 1] if i else "")
            break
    match = None
    for match in _POD_UID.finditer(path):
        pass
    pod_uid = match.group(1).replace("_", "-") if match else ""
    if pod_uid and not runtime:
        runtime = "kubernetes"
    return container_id, runtime, pod_uid


def parse_cgroup(text: str) -> tuple[str, str, str]:
    """(container_id, runtime, pod_uid) from the text of ``/proc/PID/cgroup`` (v1 or v2).

    The unified (``0::``) line is preferred; under v1 every hierarchy names the same
    container, so the first line that yields an id wins.
    """
    best = ("", "", "")
    lines = [ln.split(":", 2) for ln in text.splitlines() if ln.count(":") >= 2]
    lines.sort(key=lambda f: f[0] != "0")     # the v2 line first
    for fields in lines:
        found = _from_path(fields[2].strip())
        if found[0]:
            return found
        if found[2] and not best[2]:
            best = found
    return best


class PodDirectory:
    """Pod UID -> (pod, namespace), from kubelet log folders or the sidecar's own environment."""

    RESCAN_S = 10.0

    def __init__(self, log_root: str | os.PathLike[str] = "/var/log/pods",
                 env: Mapping[str, str] | None = None, own_pod_uid: str = "") -> None:
        self.log_root = Path(log_root)
        env = os.environ if env is None else env
        self.env_pod = env.get("POD_NAME", "")
        self.env_namespace = env.get("POD_NAMESPACE", "")
        self.own_uid = (env.get("POD_UID", "") or own_pod_uid).lower()
        self._names: dict[str, tuple[str, str]] = {}
        self._scanned_at: float | None = None
        self._lock = threading.Lock()

    def _scan(self) -> None:
        try:
            entries = os.listdir(self.log_root)
        except OSError:
            return
        names = {}
        for entry in entries:
            fields = entry.split("_")
            if len(fields) == 3:     # neither namespaces nor pod names may contain "_"
                namespace, pod, uid = fields
                names[uid.lower()] = (pod, namespace)
        self._names = names

    def lookup(self, pod_uid: str, now: float) -> tuple[str, str]:
        uid = pod_uid.lower()
        if not uid:
            return "", ""
        if uid == self.own_uid and self.env_pod:
            return self.env_pod, self.env_namespace
        with self._lock:
            if uid not in self._names and (self._scanned_at is None or now - self._scanned_at >= self.RESCAN_S):
                self._scanned_at = now
                self._scan()
            return self._names.get(uid, ("", ""))


class CgroupResolver:
    """Cached PID -> ContainerInfo. Runs on the attribution thread, never on a scrape."""

    def __init__(self, proc_root: str | os.PathLike[str] = "/proc", pods: PodDirectory | None = None,
                 cache_ttl_s: float = 30.0, max_cached: int = 4096, sidecar: bool = False) -> None:
        self.proc_root = Path(proc_root)
        # Sidecar: this pod owns its GPUs, so a GPU process whose cgroup says nothing (not in our
        # PID namespace, or hidden by a cgroup namespace) is labelled with this pod's own identity.
        self.sidecar = sidecar
        self.cache_ttl_s = cache_ttl_s
        self.max_cached = max_cached
        self._cache: OrderedDict[int, tuple[float, ContainerInfo]] = OrderedDict()
        self._lock = threading.Lock()
        if pods is None:
            own = parse_cgroup(self._read(self.proc_root / "self" / "cgroup"))[2]
            pods = PodDirectory(own_pod_uid=own)
        self.pods = pods

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError:     # the process exited, or /proc is not ours (no hostPID)
            return ""

    def lookup(self, pid: int, now: float) -> ContainerInfo:
        with self._lock:
            hit = self._cache.get(pid)
            if hit is not None and now - hit[0] < self.cache_ttl_s:
                return hit[1]
        container_id, runtime, pod_uid = parse_cgroup(self._read(self.proc_root / str(pid) / "cgroup"))
        pod, namespace = self.pods.lookup(pod_uid, now)
        if container_id or pod_uid:
            info = ContainerInfo(container_id, runtime, pod_uid, pod, namespace)
        elif self.sidecar and self.pods.env_pod:
            info = ContainerInfo("", "", self.pods.own_uid, self.pods.env_pod, self.pods.env_namespace)
        else:
            info = HOST
        with self._lock:
            self._cache[pid] = (now, info)
            self._cache.move_to_end(pid)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return info
