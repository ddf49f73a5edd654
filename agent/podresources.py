"""Which pod holds which GPU, from the kubelet pod-resources API (as dcgm-exporter does).

The kubelet serves ``v1.PodResourcesLister/List`` (gRPC) on the unix socket
``/var/lib/kubelet/pod-resources/kubelet.sock``: for each pod and container, the device IDs
the device plugin gave it. The NVIDIA device plugin's IDs are:

- ``GPU-<uuid>``: a whole GPU, held by that container alone;
- ``GPU-<uuid>::<n>``: a time-slicing replica: the GPU is shared, so SM shares decide;
- ``MIG-<uuid>`` (or the legacy ``MIG-GPU-<uuid>/<gi>/<ci>``): one MIG instance.

A whole GPU or a MIG instance held by one container is attributed to that pod without reading
``/proc/<pid>/cgroup`` (which needs ``hostPID``). Shared GPUs keep the cgroup path, and so
still need ``hostPID`` (docs/attribution.md).

The gRPC client is optional (``pip install 'wattmeter[podresources]'``, grpcio only): the few
messages used are decoded here from the protobuf wire format, so no generated code and no
``protobuf`` runtime (with its version coupling) is needed. A socket that is missing or that
the agent may not open falls back to cgroups with one warning.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

from .cgroups import ContainerInfo
from .model import ProcessUsage

log = logging.getLogger("wattmeter.podresources")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
REFRESH_S = 10.0         # the kubelet answers from memory; a pod's devices change only at (re)start
CALL_TIMEOUT_S = 2.0
GPU_RESOURCE_PREFIXES = ("nvidia.com/",)


class PodResourcesUnavailable(Exception):
    """The socket is missing, unreadable, or the kubelet does not answer. The message says why."""


# -- protobuf wire format (only what List needs) -------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of each field; unknown fields are skipped by type."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i)
            yield num, wt, value
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            yield num, wt, buf[i:i + n]
            i += n
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated field")


def _key(num: int, wt: int) -> bytes:
    return encode_varint(num << 3 | wt)


def encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def encode_bytes(num: int, data: bytes) -> bytes:
    return _key(num, 2) + encode_varint(len(data)) + data


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: tuple[ContainerDevices, ...]


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: tuple[ContainerResources, ...]


def _str(v: bytes | int) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else ""


def parse_list_response(buf: bytes) -> list[PodResources]:
    """``ListPodResourcesResponse { repeated PodResources pod_resources = 1; }``"""
    pods = []
    for num, wt, v in fields(buf):
        if num == 1 and wt == 2 and isinstance(v, bytes):
            pods.append(_pod(v))
    return pods


def _pod(buf: bytes) -> PodResources:
    name = namespace = ""
    containers = []
    for num, wt, v in fields(buf):
        if wt != 2:
            continue
        if num == 1:
            name = _str(v)
        elif num == 2:
            namespace = _str(v)
        elif num == 3 and isinstance(v, bytes):
            containers.append(_container(v))
    return PodResources(name, namespace, tuple(containers))


def _container(buf: bytes) -> ContainerResources:
    name = ""
    devices = []
    for num, wt, v in fields(buf):
        if num == 1 and wt == 2:
            name = _str(v)
        elif num == 2 and wt == 2 and isinstance(v, bytes):
            resource, ids = "", []
            for n2, w2, v2 in fields(v):
                if n2 == 1 and w2 == 2:
                    resource = _str(v2)
                elif n2 == 2 and w2 == 2:
                    ids.append(_str(v2))
            devices.append(ContainerDevices(resource, tuple(ids)))
    return ContainerResources(name, tuple(devices))


def encode_list_response(pods: Sequence[PodResources]) -> bytes:
    """The inverse of ``parse_list_response`` (for tests and fakes of the kubelet)."""
    out = bytearray()
    for p in pods:
        body = encode_bytes(1, p.name.encode()) + encode_bytes(2, p.namespace.encode())
        for c in p.containers:
            cb = encode_bytes(1, c.name.encode())
            for d in c.devices:
                db = encode_bytes(1, d.resource_name.encode()) + b"".join(encode_bytes(2, i.encode())
                                                                          for i in d.device_ids)
                cb += encode_bytes(2, db)
            body += encode_bytes(3, cb)
        out += encode_bytes(1, body)
    return bytes(out)


# -- GPU assignments ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    namespace: str
    pod: str
    container: str


@dataclass(frozen=True)
class Assignments:
    """Exclusive holders only: whole GPUs by UUID, MIG instances by (GPU UUID, GPU instance id)."""

    gpus: Mapping[str, Holder]
    mig: Mapping[tuple[str, str], Holder]
    shared: frozenset[str]         # GPU UUIDs handed out as time-slicing replicas


def assignments(pods: Sequence[PodResources],
                mig_uuids: Mapping[str, tuple[str, str]] | None = None) -> Assignments:
    """``mig_uuids``: MIG device UUID -> (parent GPU UUID, GPU instance id), for the plugin's
    ``MIG-<uuid>`` IDs; the legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` IDs carry both themselves."""
    holders: dict[str, list[Holder]] = {}
    mig: dict[tuple[str, str], list[Holder]] = {}
    shared: set[str] = set()
    for p in pods:
        for c in p.containers:
            h = Holder(p.namespace, p.name, c.name)
            for d in c.devices:
                if not d.resource_name.startswith(GPU_RESOURCE_PREFIXES):
                    continue
                for dev_id in d.device_ids:
                    if dev_id.startswith("MIG-GPU-"):
                        parent, _, rest = dev_id[len("MIG-"):].partition("/")
                        gi = rest.split("/")[0]
                        mig.setdefault((parent, gi), []).append(h)
                    elif dev_id.startswith("MIG-"):
                        where = (mig_uuids or {}).get(dev_id)
                        if where is not None:
                            mig.setdefault(where, []).append(h)
                    elif "::" in dev_id:
                        shared.add(dev_id.split("::", 1)[0])
                    else:
                        holders.setdefault(dev_id, []).append(h)
    # A device listed for several containers is shared after all: SM shares decide.
    return Assignments(
        gpus={u: hs[0] for u, hs in holders.items() if len(hs) == 1 and u not in shared},
        mig={k: hs[0] for k, hs in mig.items() if len(hs) == 1},
        shared=frozenset(shared | {u for u, hs in holders.items() if len(hs) > 1}))


# -- the client ---------------------------------------------------------------------------------
def check_socket(path: str) -> None:
    """Raise PodResourcesUnavailable naming why ``path`` cannot be used (before any gRPC call)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PodResourcesUnavailable(f"{path} does not exist (mount /var/lib/kubelet/pod-resources "
                                      "into the pod)") from None
    except PermissionError:
        raise PodResourcesUnavailable(f"{path}: permission denied") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise PodResourcesUnavailable(f"{path} is not a unix socket")
    if not os.access(path, os.R_OK | os.W_OK):
        raise PodResourcesUnavailable(f"{path}: this user (uid {os.getuid()}) may not open it; the kubelet "
                                      "socket is root's: run the agent as root or keep hostPID")


class PodResourcesClient:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout_s: float = CALL_TIMEOUT_S) -> None:
        check_socket(path)     # first: a missing socket is the likelier cause, and says what to mount
        try:
            import grpc
        except ImportError:
            raise PodResourcesUnavailable("grpcio is not installed (pip install 'wattmeter[podresources]')") \
                from None
        self._grpc = grpc
        self.path, self.timeout_s = path, timeout_s
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(path)}")
        self._list = self._channel.unary_unary(LIST_METHOD, request_serializer=lambda _req: b"",
                                               response_deserializer=parse_list_response)

    def list(self) -> list[PodResources]:
        try:
            return self._list(None, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            raise PodResourcesUnavailable(f"{self.path}: {exc.code().name}: {exc.details()}") from None
        except ValueError as exc:       # a reply that is not the expected message
            raise PodResourcesUnavailable(f"{self.path}: unreadable reply ({exc})") from None

    def close(self) -> None:
        self._channel.close()


# -- attribution without hostPID ------------------------------------------------------------------
class PodResourcesResolver:
    """Wraps the cgroup resolver: a process whose cgroup cannot be read (no ``hostPID``) on a GPU
    or MIG instance that one container holds is labelled with that pod. Shared GPUs, and every
    process the cgroup path resolves, are left as they were.

    Wire it as ``Attributor(resolver.read_processes(read), resolver.lookup, ...)``: it learns
    each PID's GPU from the process query it wraps.
    """

    def __init__(self, client: PodResourcesClient, inner: Callable[[int, float], ContainerInfo],
                 gpu_uuids: Mapping[str, str], mig_uuids: Callable[[], Mapping[str, tuple[str, str]]] | None = None,
                 refresh_s: float = REFRESH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.inner, self.gpu_uuids = client, inner, dict(gpu_uuids)   # device key -> GPU UUID
        self.mig_uuids, self.refresh_s, self.clock = mig_uuids, refresh_s, clock
        self._lock = threading.Lock()
        self._where: dict[int, tuple[str, str]] = {}      # pid -> (device key, MIG instance or "")
        self._assign: Assignments | None = None
        self._fetched = -1e18
        self.errors = 0
        self._warned = False

    def read_processes(self, read: Callable[[float], list[ProcessUsage]]) -> Callable[[float], list[ProcessUsage]]:
        def wrapped(now: float) -> list[ProcessUsage]:
            usages = read(now)
            with self._lock:
                self._where = {u.pid: (u.device_key, u.mig_instance or "") for u in usages}
            return usages
        return wrapped

    def _current(self) -> Assignments | None:
        now = self.clock()
        if now - self._fetched < self.refresh_s:
            return self._assign
        self._fetched = now
        try:
            pods = self.client.list()
        except PodResourcesUnavailable as exc:
            self.errors += 1
            if not self._warned:       # once: the cgroup path still labels what it can
                log.warning("pod-resources: %s; GPUs are mapped to pods through cgroups only", exc)
                self._warned = True
            return self._assign        # the last good answer, if any
        self._assign = assignments(pods, self.mig_uuids() if self.mig_uuids else None)
        return self._assign

    def lookup(self, pid: int, now: float) -> ContainerInfo:
        info = self.inner(pid, now)
        if info.pod:
            return info                # cgroups knew: exact, and the only way on shared GPUs
        with self._lock:
            where = self._where.get(pid)
        if where is None:
            return info
        a = self._current()
        uuid = self.gpu_uuids.get(where[0], "")
        if a is None or not uuid:
            return info
        holder = a.mig.get((uuid, where[1])) if where[1] else a.gpus.get(uuid)
        if holder is None:
            return info
        return ContainerInfo(info.container_id, info.runtime, info.pod_uid, holder.pod, holder.namespace)


def open_resolver(inner: Callable[[int, float], ContainerInfo], gpu_uuids: Mapping[str, str],
                  path: str | None, mig_uuids: Callable[[], Mapping[str, tuple[str, str]]] | None = None,
                  ) -> tuple[PodResourcesResolver | None, str | None]:
    """The resolver, or None with the one warning to print (the cgroup path is used instead).
    ``path`` None: not asked for and not in Kubernetes: no attempt, no warning."""
    if path is None:
        return None, None
    try:
        client = PodResourcesClient(path)
    except PodResourcesUnavailable as exc:
        return None, f"pod-resources API not used: {exc}; GPUs are mapped to pods through cgroups (needs hostPID)"
    return PodResourcesResolver(client, inner, gpu_uuids, mig_uuids), None


def socket_path(env: Mapping[str, str]) -> str | None:
    """``WATTMETER_POD_RESOURCES`` (a path, or "" to disable); else the kubelet's default path
    inside Kubernetes (``KUBERNETES_SERVICE_HOST`` set); else None."""
    if "WATTMETER_POD_RESOURCES" in env:
        return env["WATTMETER_POD_RESOURCES"] or None
    return DEFAULT_SOCKET if env.get("KUBERNETES_SERVICE_HOST") else None


def with_pod_resources(lookup: Callable[[int, float], ContainerInfo],
                       read: Callable[[float], list[ProcessUsage]], gpu_uuids: Mapping[str, str],
                       env: Mapping[str, str],
                       mig_uuids: Callable[[], Mapping[str, tuple[str, str]]] | None = None,
                       ) -> tuple[Callable[[int, float], ContainerInfo],
                                  Callable[[float], list[ProcessUsage]], str | None]:
    """serve's hook: the attribution's (lookup, read_processes), through pod-resources when the
    socket is there (see ``socket_path``), and the one warning to print when it is not usable.
    ``mig_uuids`` (MIG device UUID -> (GPU UUID, GPU instance id)) places the device plugin's
    ``MIG-<uuid>`` IDs; without it only the legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` IDs are placed."""
    resolver, warning = open_resolver(lookup, gpu_uuids, socket_path(env), mig_uuids)
    if resolver is None:
        return lookup, read, warning
    return resolver.lookup, resolver.read_processes(read), None
