"""GPU -> pod without hostPID: the kubelet pod-resources API, served here by a fake kubelet
(a real gRPC server on a unix socket the test starts)."""
from __future__ import annotations

import logging
import os
import socket
from concurrent import futures
from pathlib import Path

import pytest

from wattmeter.attribution import Attributor
from wattmeter.cgroups import HOST, ContainerInfo
from wattmeter.model import ProcessUsage
from wattmeter.podresources import (ContainerDevices, ContainerResources, PodResources, PodResourcesClient,
                                    PodResourcesResolver, PodResourcesUnavailable, assignments,
                                    encode_list_response, open_resolver, parse_list_response, socket_path)

grpc = pytest.importorskip("grpc")

UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-66666666-7777-8888-9999-000000000000"
UUID2 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
MIG_A = "MIG-0b1c2d3e-0000-5000-8000-000000000001"


def _pods() -> list[PodResources]:
    gpu = "nvidia.com/gpu"
    return [
        PodResources("train-0", "ml", (ContainerResources("trainer", (
            ContainerDevices(gpu, (UUID0,)), ContainerDevices("example.com/nic", ("nic0",)))),)),
        # Time-slicing: two replicas of GPU 1 handed to two pods -> shared.
        PodResources("infer-a", "serve", (ContainerResources("vllm", (ContainerDevices(gpu, (UUID1 + "::0",)),)),)),
        PodResources("infer-b", "serve", (ContainerResources("vllm", (ContainerDevices(gpu, (UUID1 + "::1",)),)),)),
        # MIG on GPU 2: instance 3 by UUID, instance 5 in the legacy form.
        PodResources("mig-a", "ml", (ContainerResources("job", (
            ContainerDevices("nvidia.com/mig-1g.10gb", (MIG_A,)),)),)),
        PodResources("mig-b", "ml", (ContainerResources("job", (
            ContainerDevices("nvidia.com/mig-1g.10gb", (f"MIG-{UUID2}/5/0",)),)),)),
        PodResources("cpu-only", "default", (ContainerResources("app", ()),)),
    ]


class FakeKubelet:
    """``v1.PodResourcesLister/List`` on a unix socket, answering with ``pods``."""

    def __init__(self, path: Path, pods: list[PodResources]) -> None:
        self.pods = pods
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def list_(request: bytes, context) -> bytes:
            self.calls += 1
            return encode_list_response(self.pods)

        handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            "List": grpc.unary_unary_rpc_method_handler(list_, request_deserializer=lambda b: b,
                                                        response_serializer=lambda b: b)})
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(f"unix://{path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture()
def kubelet(tmp_path: Path):
    # unix socket paths are limited to 107 bytes: keep it short
    path = Path(f"/tmp/wm-pr-{os.getpid()}-{id(tmp_path) % 10_000}.sock")
    fake = FakeKubelet(path, _pods())
    yield path, fake
    fake.stop()
    path.unlink(missing_ok=True)


def test_wire_format_round_trips_and_skips_unknown_fields() -> None:
    pods = _pods()
    data = encode_list_response(pods)
    assert parse_list_response(data) == pods
    # A newer kubelet adds fields (cpu_ids = 3 as packed varints, topology = 3 in devices...):
    extra = b"\x18\x05" + b"\x22\x02\x08\x01"            # field 3 varint, field 4 bytes
    assert parse_list_response(extra + data) == pods
    with pytest.raises(ValueError):
        parse_list_response(data[:-3])


def test_whole_gpus_and_mig_are_exclusive_time_sliced_gpus_are_shared() -> None:
    a = assignments(_pods(), {MIG_A: (UUID2, "3")})
    assert a.gpus == {UUID0: a.gpus[UUID0]} and a.gpus[UUID0].pod == "train-0"
    assert a.gpus[UUID0].namespace == "ml" and a.gpus[UUID0].container == "trainer"
    assert UUID1 in a.shared and UUID1 not in a.gpus
    assert a.mig[(UUID2, "3")].pod == "mig-a" and a.mig[(UUID2, "5")].pod == "mig-b"
    # Without the MIG UUID table, only the legacy form can be placed.
    assert set(assignments(_pods()).mig) == {(UUID2, "5")}


def test_client_lists_pods_from_a_real_grpc_server_on_a_unix_socket(kubelet) -> None:
    path, fake = kubelet
    client = PodResourcesClient(str(path))
    try:
        assert client.list() == _pods() and fake.calls == 1
    finally:
        client.close()


def test_processes_without_hostpid_get_their_pod_on_whole_and_mig_gpus(kubelet) -> None:
    path, fake = kubelet
    usages = [ProcessUsage("gpu0", 4001, 0.9, 0.0),                 # whole GPU of train-0
              ProcessUsage("gpu1", 4002, 0.5, 0.0),                 # time-sliced: stays unresolved
              ProcessUsage("gpu2", 4003, 0.3, 0.0, "3"),            # MIG instance 3 of mig-a
              ProcessUsage("gpu2", 4004, 0.2, 0.0, "5"),            # MIG instance 5 of mig-b
              ProcessUsage("gpu0", 4005, 0.1, 0.0)]                 # cgroups resolved it: kept

    def cgroups(pid: int, now: float) -> ContainerInfo:     # no hostPID: only 4005 is visible
        return ContainerInfo("abc", "containerd", "uid-5", "sidecar-pod", "ns5") if pid == 4005 else HOST

    resolver, warning = open_resolver(cgroups, {"gpu0": UUID0, "gpu1": UUID1, "gpu2": UUID2}, str(path),
                                      mig_uuids=lambda: {MIG_A: (UUID2, "3")})
    assert warning is None and resolver is not None
    att = Attributor(resolver.read_processes(lambda now: usages), resolver.lookup)
    att.tick(1.0)
    pods = {(k.device_key, k.namespace, k.pod) for k in att.snapshot().processes}
    assert pods == {("gpu0", "ml", "train-0"), ("gpu1", "", ""), ("gpu2", "ml", "mig-a"),
                    ("gpu2", "ml", "mig-b"), ("gpu0", "ns5", "sidecar-pod")}
    att.tick(2.0)
    assert fake.calls == 1        # answers are reused for the refresh period


def test_missing_socket_falls_back_to_cgroups_with_one_warning(tmp_path: Path) -> None:
    resolver, warning = open_resolver(lambda pid, now: HOST, {}, str(tmp_path / "kubelet.sock"))
    assert resolver is None
    assert warning is not None and "does not exist" in warning and "cgroups" in warning and "\n" not in warning


def test_socket_the_agent_may_not_open_falls_back() -> None:
    """The kubelet's socket is root's (0600); a non-root agent gets the one-line warning."""
    import subprocess
    import sys
    path = Path(f"/tmp/wm-perm-{os.getpid()}.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        os.chmod(path, 0o600)
        code = ("import os, sys; from wattmeter.podresources import open_resolver;"
                "os.getuid() == 0 and (os.setgid(65534), os.setuid(65534));"
                f"r, w = open_resolver(lambda pid, now: None, {{}}, {str(path)!r}); print(r, w)")
        if os.getuid() != 0:
            os.chmod(path, 0)          # not root: take our own access away instead
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("None pod-resources API not used:") and "may not open it" in out.stdout
    finally:
        s.close()
        path.unlink(missing_ok=True)


def test_a_plain_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.sock"
    path.write_text("")
    with pytest.raises(PodResourcesUnavailable, match="not a unix socket"):
        PodResourcesClient(str(path))


def test_kubelet_going_away_keeps_the_last_answer_and_warns_once(kubelet, caplog) -> None:
    path, fake = kubelet
    clock = [0.0]
    resolver = PodResourcesResolver(PodResourcesClient(str(path), timeout_s=0.5), lambda pid, now: HOST,
                                    {"gpu0": UUID0}, clock=lambda: clock[0])
    read = resolver.read_processes(lambda now: [ProcessUsage("gpu0", 7, 1.0, now)])
    read(0.0)
    assert resolver.lookup(7, 0.0).pod == "train-0"
    fake.stop()
    with caplog.at_level(logging.WARNING, logger="wattmeter.podresources"):
        for t in (20.0, 40.0, 60.0):
            clock[0] = t
            assert resolver.lookup(7, t).pod == "train-0"
    assert resolver.errors == 3
    assert len([r for r in caplog.records if "pod-resources" in r.getMessage()]) == 1


def test_socket_path_only_in_kubernetes_or_when_asked() -> None:
    assert socket_path({}) is None
    assert socket_path({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert socket_path({"KUBERNETES_SERVICE_HOST": "x", "WATTMETER_POD_RESOURCES": ""}) is None
    assert socket_path({"WATTMETER_POD_RESOURCES": "/run/k.sock"}) == "/run/k.sock"


# -- through `wattmeter serve` ---------------------------------------------------------------------
SERVE_SCENARIO = """
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
[gpu.trace]
kind = "constant"
power_w = 300.0
[[gpu.process]]
pid = 4242
sm_util = 80
"""


def _serve_until_process_series(tmp_path: Path, env_socket: str, monkeypatch,
                                scenario_text: str = SERVE_SCENARIO) -> tuple[str, str]:
    """Run serve with no visible /proc (as without hostPID); return (stderr, /metrics text)."""
    import time

    from e2e_servers import WattmeterServe, http_get, wait_until

    scenario = tmp_path / "s.toml"
    scenario.write_text(scenario_text)
    (tmp_path / "proc").mkdir()
    monkeypatch.setenv("WATTMETER_POD_RESOURCES", env_socket)      # inherited by the serve process
    serve = WattmeterServe(["--fake-nvml", str(scenario), "--cpu", "model", "--process-interval", "0.2",
                            "--proc-root", str(tmp_path / "proc"), "--pods-root", str(tmp_path / "pods")],
                           tmp_path / "serve")
    try:
        def series() -> str | None:
            body = http_get(f"{serve.url}/metrics")[1].decode()
            return body if "wattmeter_process_gpu_energy_joules_total{" in body else None
        body = wait_until(series, 60, "a per-process series")
        time.sleep(0.5)
        return serve.output, body
    finally:
        serve.stop()


def _pod_of_process_series(body: str) -> tuple[str, str]:
    from prometheus_client.parser import text_string_to_metric_families
    s = [x for f in text_string_to_metric_families(body) for x in f.samples
         if x.name == "wattmeter_process_gpu_energy_joules_total"]
    assert len(s) == 1, s
    return s[0].labels["namespace"], s[0].labels["pod"]


@pytest.mark.e2e
def test_serve_labels_a_whole_gpu_with_its_pod_without_hostpid(tmp_path: Path, monkeypatch) -> None:
    from wattmeter.sim.scenario import load_scenario
    (tmp_path / "s.toml").write_text(SERVE_SCENARIO)
    uuid = load_scenario(str(tmp_path / "s.toml")).gpus[0].uuid
    sock = Path(f"/tmp/wm-serve-{os.getpid()}.sock")
    fake = FakeKubelet(sock, [PodResources("train-0", "ml", (ContainerResources(
        "trainer", (ContainerDevices("nvidia.com/gpu", (uuid,)),)),))])
    try:
        stderr, body = _serve_until_process_series(tmp_path, str(sock), monkeypatch)
    finally:
        fake.stop()
        sock.unlink(missing_ok=True)
    assert _pod_of_process_series(body) == ("ml", "train-0")
    assert "pod-resources" not in stderr
    assert fake.calls >= 1


@pytest.mark.e2e
def test_serve_without_the_socket_warns_once_and_keeps_metering(tmp_path: Path, monkeypatch) -> None:
    stderr, body = _serve_until_process_series(tmp_path, str(tmp_path / "absent.sock"), monkeypatch)
    warnings = [ln for ln in stderr.splitlines() if "pod-resources" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("wattmeter: warning: pod-resources API not used: ")
    assert "does not exist" in warnings[0]
    assert _pod_of_process_series(body) == ("", "")


MIG_SCENARIO = """
[[gpu]]
model = "NVIDIA A100-SXM4-80GB"
[gpu.trace]
kind = "constant"
power_w = 290.0
[[gpu.mig]]
gi_id = 1
sm_share = 0.4286
[[gpu.mig]]
gi_id = 5
sm_share = 0.2857
[[gpu.process]]
pid = 7002
sm_util = 30
gi_id = 5
"""


@pytest.mark.e2e
def test_serve_places_a_mig_uuid_from_the_device_plugin_on_its_pod(tmp_path: Path, monkeypatch) -> None:
    # The device plugin's default IDs for MIG are "MIG-<uuid>"; serve learns each MIG UUID's
    # parent GPU and instance from NVML, so the process in instance 5 gets the pod that holds it.
    from wattmeter.clock import VirtualClock
    from wattmeter.sim.fake_nvml import FakeNVML
    from wattmeter.sim.scenario import load_scenario

    (tmp_path / "mig.toml").write_text(MIG_SCENARIO)
    fake_nvml = FakeNVML(load_scenario(str(tmp_path / "mig.toml")), VirtualClock())
    fake_nvml.nvmlInit()
    gpu = fake_nvml.nvmlDeviceGetHandleByIndex(0)
    mig5 = next(fake_nvml.nvmlDeviceGetUUID(m) for m in (fake_nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i)
                                                          for i in range(2))
                if fake_nvml.nvmlDeviceGetGpuInstanceId(m) == 5)
    assert mig5.startswith("MIG-") and not mig5.startswith("MIG-GPU-")
    sock = Path(f"/tmp/wm-serve-mig-{os.getpid()}.sock")
    fake = FakeKubelet(sock, [PodResources("notebook-0", "research", (ContainerResources(
        "lab", (ContainerDevices("nvidia.com/mig-2g.20gb", (mig5,)),)),))])
    try:
        stderr, body = _serve_until_process_series(tmp_path, str(sock), monkeypatch, MIG_SCENARIO)
    finally:
        fake.stop()
        sock.unlink(missing_ok=True)
    assert _pod_of_process_series(body) == ("research", "notebook-0")
    assert "pod-resources" not in stderr
