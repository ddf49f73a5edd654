"""No orphan jobs: a child of ``run`` never outlives the agent, nor does anything it started.

``die_with_parent`` (Linux ``PR_SET_PDEATHSIG``, called in the child between fork and exec)
kills the direct child the moment the agent dies. ``start_watchdog`` starts a tiny process
beside it that follows the child's whole process tree and kills it once the agent is gone, so
a launcher's workers or the ``python`` under a shell script die too (an agent killed by the OOM
killer never leaves a job holding a GPU, unmetered).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Callable

PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, from the symbols already loaded (no library search: run start-up stays fast)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
CAN_DIE_WITH_PARENT = _PRCTL is not None


def die_with_parent(parent: int) -> None:
    """In a child between fork and exec: SIGKILL it when ``parent`` dies (Linux only)."""
    assert _PRCTL is not None
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:       # the parent died before the prctl took hold
        os._exit(128 + signal.SIGKILL)

WATCHDOG = """\
import os, signal, sys, time
agent, child = int(sys.argv[1]), int(sys.argv[2])
for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)      # the terminal's signals are the agent's to forward


def started(pid):
    # A process's start time tells it from a later one that reused its pid.
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            s = f.read()
        return s[s.rindex(b")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def children(pid):
    out = []
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


have_proc = started(child) is not None
tree = {child: started(child)}
while True:
    time.sleep(0.2)
    if os.getppid() != agent:               # the agent died: we were re-parented
        for pid, st in tree.items():
            if (st is not None and started(pid) == st) or (pid == child and not have_proc):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        break
    if not have_proc:                       # no /proc: guard the child alone
        try:
            os.kill(child, 0)
        except OSError:
            break
        continue
    # The job's whole tree, kept across re-parenting: a grandchild whose parent exited is
    # still the job's (torchrun workers, the python under a shell script).
    seen, stack = {}, [child]
    while stack:
        pid = stack.pop()
        st = started(pid)
        if st is None or pid in seen:
            continue
        seen[pid] = st
        stack += children(pid)
    for pid, st in tree.items():
        if pid not in seen and st is not None and started(pid) == st:
            seen[pid] = st
    if not seen:
        break                               # the job is gone: nothing to guard
    tree = seen
"""


def start_watchdog(agent_pid: int, child_pid: int) -> subprocess.Popen:
    """A tiny process, child of the agent, that kills the job's whole process tree when the
    agent disappears (SIGKILL, the OOM killer). PR_SET_PDEATHSIG covers only the direct child;
    this also reaches the processes it started, which would otherwise run on unmetered."""
    return subprocess.Popen([sys.executable, "-S", "-c", WATCHDOG, str(agent_pid), str(child_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)
