"""Owned child processes (ground/procs.py): the whole process group goes when its owner goes.

Real processes throughout: an owner Python process starts a shell under the watchdog, the shell
starts a grandchild (as vLLM starts its engine core), and the owner is then killed or exits.
Every process carries ALIGNLOOP_TEST_TAG, so the count also finds processes reparented to init.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ground.procs import owned_popen, run_owned, stop_group

REPO = Path(__file__).resolve().parents[2]
# A child that ignores SIGTERM in its grandchild: only the SIGKILL after the grace period ends it.
STUBBORN = "trap '' TERM; sleep 300 & wait"
OWNER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from ground.procs import owned_popen
    proc = owned_popen(["sh", "-c", {cmd!r}], grace_s=1.0)
    print(proc.pid, flush=True)
    time.sleep(300)
    """
)


def _owner(cmd: str) -> tuple[subprocess.Popen, int]:
    # The SIGINT case needs Python's KeyboardInterrupt in the owner: give it SIGINT's default
    # disposition whatever the test runner inherited (an ignored SIGINT is inherited, and Python
    # then installs no handler).
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER.format(repo=str(REPO), cmd=cmd)], stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = int(owner.stdout.readline())
    return owner, watchdog


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_group_dies_with_its_owner(proc_tag, sig: signal.Signals) -> None:
    owner, _ = _owner("sleep 300 & sleep 300 & wait")
    time.sleep(1.0)  # the shell and both sleeps are up
    assert len(proc_tag(0)) >= 4  # owner, watchdog, shell, sleeps
    owner.send_signal(sig)
    owner.wait(timeout=10)
    assert proc_tag(15) == [], "processes outlived their owner"


def test_sigterm_ignoring_grandchild_is_killed_after_grace(proc_tag) -> None:
    owner, _ = _owner(STUBBORN)
    time.sleep(1.0)
    owner.kill()
    owner.wait(timeout=10)
    t0 = time.monotonic()
    assert proc_tag(15) == []
    assert time.monotonic() - t0 >= 0.5  # it waited out (part of) the 1 s grace before SIGKILL


def test_stop_group_and_exit_codes(proc_tag, tmp_path: Path) -> None:
    proc = owned_popen(["sh", "-c", "sleep 300 & sleep 300"])
    time.sleep(0.5)
    stop_group(proc, timeout_s=5)
    assert proc.returncode is not None
    assert proc_tag(5) == []
    # A command that ends by itself: its code comes back through the watchdog.
    assert run_owned(["sh", "-c", "exit 3"], timeout_s=30) == 3
    with open(tmp_path / "o", "w") as out:
        assert run_owned([sys.executable, "-c", "print('hi')"], timeout_s=30, stdout=out) == 0
    assert (tmp_path / "o").read_text() == "hi\n"


def test_run_owned_timeout_stops_the_group(proc_tag) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run_owned(["sh", "-c", "sleep 300 & sleep 300"], timeout_s=1)
    assert proc_tag(5) == []


def test_watchdog_exits_when_owner_is_already_gone(proc_tag) -> None:
    """An owner that died before the watchdog looked: nothing is left running."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    proc = subprocess.Popen(
        [sys.executable, "-I", str(REPO / "ground" / "procs.py"), "--owner", str(dead.pid),
         "--grace", "1", "--", "sleep", "300"],
        start_new_session=True,
    )
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert proc_tag(5) == []
