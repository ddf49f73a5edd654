"""PID -> container/pod mapping against checked-in /proc/PID/cgroup fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from wattmeter.cgroups import HOST, CgroupResolver, PodDirectory, parse_cgroup

PROC = Path(__file__).parent / "fixtures" / "proc_cgroup"
DOCKER = "3f4ad1c2b9e0" + "a" * 52
CTRD = "9b1e0123456789abcdef0123456789abcdef0123456789abcdefc0ffee012345"
CRIO = "e5fedcba9876543210fedcba9876543210fedcba9876543210aa55aa55aa55aa"
UID1 = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
UID2 = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize("pid, container_id, runtime, pod_uid", [
    (1001, DOCKER, "docker", ""),                 # docker, cgroup v1
    (1002, DOCKER, "docker", ""),                 # docker, cgroup v2 + systemd
    (1003, CTRD, "containerd", UID1),             # kubernetes + containerd, v2 + systemd
    (1004, CTRD, "kubernetes", UID1),             # kubernetes, v1 + cgroupfs (runtime not in the path)
    (1005, CRIO, "cri-o", UID2),                  # kubernetes + cri-o, v2
    (1006, CRIO, "cri-o", UID2),                  # kubernetes + cri-o, v1 + systemd
    (1007, CTRD, "containerd", UID1),             # containerd v1 systemd "slice:cri-containerd:id" form
    (1011, CTRD, "containerd", UID1),             # guaranteed QoS: no tier slice
    (1012, CTRD, "containerd", ""),               # containerd k8s.io namespace, cgroupfs
    (1013, CRIO, "cri-o", UID2),                  # cri-o, v1 + cgroupfs
])
def test_container_and_pod_from_fixture(pid: int, container_id: str, runtime: str, pod_uid: str) -> None:
    text = (PROC / str(pid) / "cgroup").read_text()
    assert parse_cgroup(text) == (container_id, runtime, pod_uid)


def test_podman_container() -> None:
    assert parse_cgroup(f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CRIO}.scope\n") == \
        (CRIO, "podman", "")


@pytest.mark.parametrize("pid", [1008, 1009, 1010])
def test_host_processes_and_conmon_have_no_container(pid: int) -> None:
    assert parse_cgroup((PROC / str(pid) / "cgroup").read_text())[0] == ""


def test_pod_name_and_namespace_from_kubelet_log_folders(tmp_path: Path) -> None:
    (tmp_path / f"ml-serving_llama-7f9c_{UID1}" / "vllm").mkdir(parents=True)
    (tmp_path / f"batch_train-0_{UID2}").mkdir()
    (tmp_path / "not-a-pod-folder").mkdir()
    resolver = CgroupResolver(PROC, PodDirectory(tmp_path, env={}))
    info = resolver.lookup(1003, now=0.0)
    assert (info.container_id, info.pod_uid, info.pod, info.namespace) == (CTRD, UID1, "llama-7f9c", "ml-serving")
    assert resolver.lookup(1005, now=0.0).pod == "train-0"


def test_new_pod_folder_is_found_after_rescan(tmp_path: Path) -> None:
    pods = PodDirectory(tmp_path, env={})
    assert pods.lookup(UID1, now=0.0) == ("", "")
    (tmp_path / f"ns_late_{UID1}").mkdir()
    assert pods.lookup(UID1, now=1.0) == ("", "")            # rescans are rate-limited
    assert pods.lookup(UID1, now=1.0 + PodDirectory.RESCAN_S) == ("late", "ns")


def test_sidecar_names_its_own_pod_from_the_downward_api_env(tmp_path: Path) -> None:
    env = {"POD_NAME": "llama-0", "POD_NAMESPACE": "serving"}
    own = parse_cgroup((PROC / "self" / "cgroup").read_text())[2]
    resolver = CgroupResolver(PROC, PodDirectory(tmp_path, env=env, own_pod_uid=own))
    assert own == UID2
    info = resolver.lookup(1005, now=0.0)      # same pod UID as our own
    assert (info.pod, info.namespace) == ("llama-0", "serving")
    assert resolver.lookup(1003, now=0.0).pod == ""           # another pod: unknown, never guessed


def test_vanished_process_is_host_and_lookups_are_cached(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text(f"0::/system.slice/docker-{DOCKER}.scope\n")
    resolver = CgroupResolver(proc, PodDirectory(tmp_path / "none", env={}), cache_ttl_s=30.0)
    assert resolver.lookup(42, now=0.0).container_id == DOCKER
    (proc / "42" / "cgroup").unlink()
    assert resolver.lookup(42, now=5.0).container_id == DOCKER      # cached
    assert resolver.lookup(42, now=31.0) == HOST                    # expired: the process is gone
    assert resolver.lookup(99999, now=0.0) == HOST


def test_sidecar_labels_invisible_gpu_processes_with_its_own_pod(tmp_path: Path) -> None:
    env = {"POD_NAME": "llama-0", "POD_NAMESPACE": "serving", "POD_UID": UID2}
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text("0::/\n")               # a private cgroup namespace says nothing
    sidecar = CgroupResolver(proc, PodDirectory(tmp_path / "none", env=env), sidecar=True)
    for pid in (7, 4242):                                       # 4242: a host PID outside our PID namespace
        info = sidecar.lookup(pid, now=0.0)
        assert (info.pod, info.namespace, info.pod_uid) == ("llama-0", "serving", UID2)
    node_agent = CgroupResolver(proc, PodDirectory(tmp_path / "none", env=env))
    assert node_agent.lookup(4242, now=0.0) == HOST            # a DaemonSet never claims unknown processes
