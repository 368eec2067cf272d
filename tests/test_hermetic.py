"""The suite is hermetic: its own data dir, keys and key secret, in this process and every
process it starts; never the user's ``<checkout>/.alignloop`` (tests/conftest.py sets it up at
import and fails the run at session end if that folder changed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_HOME = REPO / ".alignloop"


def test_the_data_dir_is_the_sessions_not_the_checkouts() -> None:
    from ground.config import data_dir
    from serving.gateway.auth import keys_file_path
    from serving.gateway.config import GatewayConfig, key_secret_path

    assert not data_dir().is_relative_to(REPO)
    # A gateway built without a keys file reads <data dir>/keys.yaml: the session's, not the user's.
    assert not keys_file_path(GatewayConfig()).is_relative_to(USER_HOME)
    assert not key_secret_path(None).is_relative_to(USER_HOME)
    assert len(os.environ["ALIGNLOOP_KEY_SECRET"]) >= 32  # no key secret file is read or made


def test_a_process_the_suite_starts_sees_the_same_data_dir() -> None:
    code = ("import json, os; from ground.config import data_dir; "
            "print(json.dumps([str(data_dir()), os.environ.get('ALIGNLOOP_KEY_SECRET', '')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    home, secret = json.loads(out.stdout)
    assert not Path(home).is_relative_to(REPO)
    assert secret == os.environ["ALIGNLOOP_KEY_SECRET"]


def test_the_session_end_check_sees_a_write(tmp_path: Path, data_dir_guard) -> None:
    """The check that guards <checkout>/.alignloop reports a file added or rewritten, and a data
    dir created where there was none."""
    guard = data_dir_guard(tmp_path / ".alignloop")
    assert guard.snapshot() == {}
    (guard.root / "cache").mkdir(parents=True)
    (guard.root / "keys.yaml").write_text("keys: []\n")
    assert guard.changes({})  # created
    before = guard.snapshot()
    assert guard.changes(before) == []
    (guard.root / "cache" / "fingerprints").mkdir()
    (guard.root / "keys.yaml").write_text("keys: [] # rewritten\n")
    changes = guard.changes(before)
    assert "added cache/fingerprints" in changes and "changed keys.yaml" in changes
