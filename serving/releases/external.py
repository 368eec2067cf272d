"""External OpenAI-compatible servers as releases (``upstream_url``: a vLLM a team already runs,
or a benchmark's synthetic upstream): no process is started or stopped for one; it is
health-checked the same way as ours (``/v1/models`` answers and one real generation works) and
switched to atomically like any other release.
"""

from __future__ import annotations

import os
import time

import httpx

from serving.engine.vllm_server import VLLMStartError, check_generation
from serving.gateway.upstream import EXTERNAL_TOOLS
from serving.releases.records import Release


class ExternalServer:
    """An external OpenAI-compatible server, with the part of :class:`VLLMServer`'s interface
    the manager uses: readiness is ``/v1/models`` answering plus one real generation; there is
    no process to start or stop."""

    proc = None
    tool_parser = EXTERNAL_TOOLS  # tools are the external server's business: requests pass

    def __init__(self, rel: Release) -> None:
        self.base_url = rel.upstream_url.rstrip("/")
        self.served_name = rel.served_name
        self.api_key = os.environ.get(rel.api_key_env) if rel.api_key_env else None
        self.timeout_s = rel.args().startup_timeout_s
        self.startup_s: float | None = None

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, wait: bool = True) -> ExternalServer:
        return self

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def wait_ready(self) -> float:
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < self.timeout_s:
            try:
                r = httpx.get(self.base_url + "/models", headers=self._headers(), timeout=5)
                if r.status_code == 200:
                    break
                last = f"/v1/models answered {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
        else:
            raise VLLMStartError(f"external upstream {self.base_url} not ready: {last}")
        try:
            self.check_generation()
        except Exception as e:  # noqa: BLE001 - any failure: not promotable
            raise VLLMStartError(
                f"external upstream {self.base_url} failed a real generation with model "
                f"{self.served_name!r}: {e}"
            ) from None
        self.startup_s = time.monotonic() - t0
        return self.startup_s

    def check_generation(self, client: httpx.Client | None = None, timeout_s: float = 60) -> str:
        """One short chat completion, with this server's API key; raise if it fails."""
        return check_generation(self.base_url, self.served_name, client, timeout_s, self._headers())

