"""Child processes that never outlive the process that started them.

A long-running child (a vLLM server, an ``accelerate launch`` of a training stage, a gateway, a
benchmark client) starts in a new process group under a small watchdog: this file, run by path
(``python -I procs.py --owner PID -- CMD ...``; standard library only). The watchdog starts
``CMD`` in its own group and watches the owner through a pidfd. When the owner exits, however it
exits (SIGKILL too), or when the watchdog gets SIGTERM/SIGINT/SIGHUP, it sends SIGTERM to the
whole group (so vLLM's engine core and torch's worker ranks are reached, not only the direct
child), waits ``grace`` seconds, then SIGKILLs what is left. When ``CMD`` exits by itself the
watchdog sweeps the group the same way and exits with ``CMD``'s code.

``PR_SET_PDEATHSIG`` alone did not do this: it fires when the *thread* that forked exits, it
reaches only the direct child, and a SIGTERM that killed ``alignloop doctor`` during vLLM's
start-up left the server running, reparented to init.

    proc = owned_popen(["vllm", "serve", ...], stdout=log)
    ...
    stop_group(proc)          # SIGTERM the group, then SIGKILL; waits until it is gone
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WATCHDOG = Path(__file__).resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def owned_command(cmd: Sequence[str], grace_s: float = 15.0) -> list[str]:
    """``cmd`` wrapped in the watchdog for the current process as owner."""
    return [sys.executable, "-I", str(WATCHDOG), "--owner", str(os.getpid()),
            "--grace", str(grace_s), "--", *map(str, cmd)]


def owned_popen(cmd: Sequence[str], grace_s: float = 15.0, **popen_kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` under the watchdog in a new session (so terminal signals reach only us).

    ``popen_kwargs`` go to :class:`subprocess.Popen` (stdout, env, cwd, ...).
    """
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(owned_command(cmd, grace_s), start_new_session=True, **popen_kwargs)


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (its leader), then SIGKILL; wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            with contextlib.suppress(ProcessLookupError):  # stragglers of the group
                os.killpg(proc.pid, signal.SIGKILL)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    wait_group_gone(proc.pid)


def run_owned(cmd: Sequence[str], timeout_s: float | None = None, **popen_kwargs: Any) -> int:
    """Like ``subprocess.run(cmd).returncode``, but an exception or a timeout here (Ctrl-C,
    SIGTERM turned into SystemExit) stops the whole group, and our death stops it too."""
    proc = owned_popen(cmd, **popen_kwargs)
    try:
        return proc.wait(timeout=timeout_s)
    except BaseException:
        stop_group(proc)
        raise


def wait_group_gone(pgid: int, timeout_s: float = 10) -> bool:
    """Wait until no process of group ``pgid`` is left; False if some still are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a member we may not signal: still there
            pass
        time.sleep(0.1)
    return False


# -- the watchdog itself (runs as a script: standard library only) ---------------------------------
def _group_members(pgid: int) -> list[int]:
    """Pids of the group other than this process (Linux /proc)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _signal_group(sig: int) -> None:
    for pid in _group_members(os.getpgrp()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop_all(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM every other member of our group, wait up to ``grace_s``, then SIGKILL the rest."""
    _signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        if not _group_members(os.getpgrp()):
            return
        time.sleep(0.2)
    _signal_group(signal.SIGKILL)
    child.poll()


def _die_with_us() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The direct child gets SIGTERM if the watchdog itself is SIGKILLed (single thread here)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _watch(owner: int, grace_s: float, cmd: list[str]) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    reason: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        reason.append(f"got {signal.Signals(signum).name}")
        with contextlib.suppress(OSError):
            os.write(wake_w, b"x")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        owner_fd: int | None = os.pidfd_open(owner)
    except ProcessLookupError:
        owner_fd, reason[:] = None, [f"owner {owner} already gone"]
    except (AttributeError, OSError):  # no pidfd (old kernel, sandbox): poll the pid instead
        owner_fd = None
    child = subprocess.Popen(cmd, preexec_fn=_die_with_us)
    while not reason:
        if child.poll() is not None:
            _stop_all(child, 2.0)  # stragglers of a command that exited by itself
            code = child.returncode
            return code if code >= 0 else 128 - code
        fds = [wake_r] + ([owner_fd] if owner_fd is not None else [])
        ready, _, _ = select.select(fds, [], [], 0.5)
        if owner_fd is not None and owner_fd in ready:
            reason.append(f"owner {owner} exited")
        elif owner_fd is None and not reason:
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                reason.append(f"owner {owner} exited")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    print(f"[alignloop watchdog] {reason[0]}: stopping process group {os.getpgrp()}",
          file=sys.stderr, flush=True)
    _stop_all(child, grace_s)
    return 128 + signal.SIGTERM


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Run a command that dies with its owner.")
    ap.add_argument("--owner", type=int, required=True)
    ap.add_argument("--grace", type=float, default=15.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command")
    return _watch(a.owner, a.grace, cmd)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
