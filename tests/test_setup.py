"""`make setup`'s browser step: it says what it installs system-wide before doing it and can be
skipped; the browser tests then skip with a reason, and CI (CI=true, .ci/run) fails them instead.

The Makefile runs for real; only the system's package manager is a stand-in (``apt-get`` and
``sudo`` scripts that record their arguments): installing Chromium is outside what a test may do.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make") or "make"  # found before the tests narrow PATH


def _fake_system(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH with no chromium, a recording apt-get and sudo, and ``id``; returns (env, record)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/bash\necho "apt-get $*"; echo "apt-get $*" >> {record}\n')
    (bin_dir / "sudo").write_text('#!/bin/bash\nexec "$@"\n')
    for tool in ("apt-get", "sudo"):
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "id").symlink_to(shutil.which("id"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNLOOP_CHROMIUM", "ALIGNLOOP_SKIP_BROWSER", "SKIP_BROWSER", "MAKEFLAGS")}
    env["PATH"] = str(bin_dir)
    return env, record


def _make(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-s", "-C", str(REPO), "browser", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_setup_says_what_it_installs_system_wide_before_installing(tmp_path: Path) -> None:
    env, record = _fake_system(tmp_path)
    out = _make(env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    said = next(i for i, line in enumerate(lines) if "SYSTEM-WIDE, as root" in line)
    installed = lines.index("apt-get install -y -q chromium")
    assert said < installed, out.stdout  # said first, then done
    assert "about 130 packages" in out.stdout and "make setup SKIP_BROWSER=1" in out.stdout
    assert record.read_text().splitlines() == ["apt-get update -q", "apt-get install -y -q chromium"]


@pytest.mark.parametrize("skip", [["SKIP_BROWSER=1"], []], ids=["make-variable", "environment"])
def test_setup_skips_the_browser_when_asked(tmp_path: Path, skip: list[str]) -> None:
    env, record = _fake_system(tmp_path)
    if not skip:
        env["ALIGNLOOP_SKIP_BROWSER"] = "1"
    out = _make(env, *skip)
    assert out.returncode == 0, out.stderr
    assert "browser tests will skip" in out.stdout and not record.exists()


def _chromium_path():
    """The browser tests' own lookup (tests/review/test_review_browser.py)."""
    path = REPO / "tests" / "review" / "test_review_browser.py"
    spec = importlib.util.spec_from_file_location("review_browser_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chromium_path


def test_browser_tests_skip_without_chromium_but_fail_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium_path = _chromium_path()
    monkeypatch.delenv("ALIGNLOOP_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="SKIP_BROWSER=1"):
        chromium_path()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        chromium_path()
    monkeypatch.setenv("ALIGNLOOP_CHROMIUM", "/opt/my/chromium")
    assert chromium_path() == "/opt/my/chromium"


def test_ci_runs_with_ci_true() -> None:
    assert "export CI=true" in (REPO / ".ci" / "run").read_text()


def test_prepare_is_part_of_setup_and_demo_but_never_of_test() -> None:
    """`make setup` and `make demo` make the embedded model and take the platform probe in the
    user's data dir (once per machine), so the demo's ten minutes start after them; `make test`
    (CI) must not touch that data dir, so it never runs `alignloop prepare`."""
    def planned(target: str) -> str:
        out = subprocess.run([MAKE, "-n", "-C", str(REPO), target, "SKIP_BROWSER=1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "alignloop prepare" in planned("setup")
    assert "alignloop prepare" in planned("demo")
    assert "alignloop prepare" not in planned("test")
