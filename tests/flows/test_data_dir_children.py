"""Children that run from the checkout (the demo's gateway, launched training) are told the data
dir: a command started in another directory, with ALIGNLOOP_HOME unset, must not leave its
children on ``<checkout>/.alignloop`` (the demo then waited 10 minutes for a gateway that served,
and wrote to, another data dir)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ground.config import data_dir, repo_root


class _Stop(Exception):
    pass


def test_the_demo_gateway_and_launched_stages_get_the_callers_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("ALIGNLOOP_HOME", raising=False)
    assert data_dir() == (elsewhere / ".alignloop").resolve() and repo_root() != elsewhere
    seen: list[dict] = []

    def popen(cmd, **kwargs):
        seen.append(kwargs)
        raise _Stop

    import flows.demo
    import training.launch

    # Each caller's own name for it: both import it at the top of their module.
    monkeypatch.setattr(flows.demo, "owned_popen", popen)
    monkeypatch.setattr(training.launch, "owned_popen", popen)
    from flows.demo import _start_gateway

    with pytest.raises(_Stop):
        _start_gateway(tmp_path / "serve.log")
    from training.launch import _stream

    with pytest.raises(_Stop):
        _stream([sys.executable, "-c", "pass"], {"PATH": "/usr/bin"}, tmp_path / "sft.log", "sft", print)
    assert [kw["cwd"] for kw in seen] == [repo_root(), repo_root()]
    assert [kw["env"]["ALIGNLOOP_HOME"] for kw in seen] == [str(data_dir())] * 2


def test_a_child_from_the_checkout_resolves_the_data_dir_it_is_given(tmp_path: Path) -> None:
    """The mechanism itself: ALIGNLOOP_HOME wins over the child's working directory."""
    out = subprocess.run(
        [sys.executable, "-c", "from ground.config import data_dir; print(data_dir())"],
        cwd=repo_root(), env={"ALIGNLOOP_HOME": str(tmp_path / "home"), "PATH": "/usr/bin"},
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str((tmp_path / "home").resolve())
