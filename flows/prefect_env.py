"""Where flows report to: the user's Prefect server, our local UI server, or ephemeral mode.

Order of precedence:
1. ``PREFECT_API_URL`` set by the user (their own server or Prefect Cloud): used as is.
2. A local server started by ``alignloop ui`` (its URL is recorded in the data dir): used while it
   answers its health check, so runs show up in that UI.
3. Otherwise Prefect's ephemeral mode (a temporary API over the local SQLite database).

Call :func:`configure` before importing ``prefect``: Prefect reads its settings at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ground.config import data_dir

# On a fresh PREFECT_HOME (a new machine, CI) the ephemeral server migrates its SQLite database
# first; on two cores that outlasts Prefect's default start-up timeout (docs/PLATFORM.md: it failed
# with "Timed out while attempting to connect to ephemeral Prefect API server" and ran with 180 s).
EPHEMERAL_STARTUP_TIMEOUT_S = "180"


def ui_state_file() -> Path:
    return data_dir() / "prefect-ui.json"


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def configure() -> str:
    """Set the Prefect environment for this process; return a description of where runs go."""
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S
    )
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect server at {os.environ['PREFECT_API_URL']}"
    try:
        state = json.loads(ui_state_file().read_text())
    except (OSError, ValueError):
        state = {}
    api_url = state.get("api_url")
    if api_url and _healthy(api_url):
        os.environ["PREFECT_API_URL"] = api_url
        return f"local Prefect UI at {state.get('ui_url', api_url)}"
    return "Prefect ephemeral mode (run `alignloop ui` to watch runs in the Prefect UI)"


def start_ui(host: str = "127.0.0.1", port: int = 4200, wait_s: float = 240) -> dict[str, str]:
    """Start ``prefect server start`` in the background, wait until healthy, record its URL."""
    api_url, ui_url = f"http://{host}:{port}/api", f"http://{host}:{port}"
    if _healthy(api_url):
        return {"api_url": api_url, "ui_url": ui_url, "pid": "already running"}
    log_path = data_dir() / "logs" / "prefect-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    deadline = time.monotonic() + wait_s
    while not _healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start; see {log_path}")
        time.sleep(1)
    state = {"api_url": api_url, "ui_url": ui_url, "pid": str(proc.pid), "log": str(log_path)}
    ui_state_file().write_text(json.dumps(state, indent=2))
    return state
