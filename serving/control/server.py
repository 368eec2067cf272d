"""The ``alignloop serve`` runtime: gateway app + ReleaseManager + uvicorn, in one process.

This process owns every vLLM it starts. The live release boots in the background while the
gateway already listens (it answers 503 until the upstream is ready); on exit (SIGINT/SIGTERM,
or an error) every vLLM is stopped, and if the process is killed outright each server's
watchdog stops it (:mod:`ground.procs`).

While it runs, ``<data dir>/server.json`` says where it listens, so ``alignloop release ...``
talks to its admin API instead of editing the files under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from evals.gate import GateConfig
from ground.config import ConfigError, StrictModel, data_dir, load_config, repo_root
from guardrails.pii import import_presidio_for_serving
from serving.engine.vllm_server import VLLMArgs
from serving.gateway.config import GatewayConfig, load_gateway_config
from serving.gateway.dataplane import ControlPlane
from serving.releases.manager import ReleaseManager
from serving.releases.placement import PlacementConfig
from serving.releases.records import ReleaseError
from serving.releases.staging import StagingPolicy
from serving.releases.store import ReleaseStore
from training.base_model import resolve_base_model

log = logging.getLogger(__name__)


class ReleasesConfig(StrictModel):
    """How the gateway runs releases."""

    grace_s: float = Field(
        600.0,
        ge=0,
        description="Seconds the previous release stays warm after a switch (instant rollback); "
        "keep it above the longest request. 0 = stop it at once.",
    )
    default_args: VLLMArgs = Field(
        default_factory=VLLMArgs,
        description="vLLM arguments for releases staged without their own.",
    )
    gate_file: str = Field(
        "configs/gate.yaml",
        description="Gate policy this gateway recomputes a decision with before an unforced promotion "
        "(relative paths are from the repo root).",
    )
    initial_model: str | None = Field(
        "embedded",
        description="Staged and promoted when no release is live yet ('embedded', a folder or a "
        "hub id); None = start with no upstream (503) until one is promoted.",
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig,
        description="How releases share the GPUs: whole GPUs or memory shares (GPU machines only).",
    )
    upstream_url: str | None = Field(
        None,
        description="Front an OpenAI-compatible server you already run (e.g. your vLLM, "
        "http://host:8000/v1) instead of starting one: it becomes the live release "
        "(initial_model is then not used).",
    )
    upstream_model: str | None = Field(
        None, description="The model name that server answers to (required with upstream_url)."
    )
    upstream_api_key_env: str | None = Field(
        None, description="Environment variable holding that server's API key, if it needs one."
    )

    @model_validator(mode="after")
    def _external_needs_model(self) -> ReleasesConfig:
        if self.upstream_url and not self.upstream_model:
            raise ValueError("upstream_model: required with upstream_url (the model name it serves)")
        return self
    staging: StagingPolicy = Field(
        default_factory=StagingPolicy,
        description="What the admin API may stage (model folders, vLLM arguments): an admin key "
        "deploys models, it does not run code.",
    )

    @model_validator(mode="after")
    def _gate_file_loads(self) -> ReleasesConfig:
        """A gate policy that does not load fails at start-up, not at the first promotion."""
        try:
            load_config(GateConfig, self.gate_path())
        except ConfigError as exc:
            raise ValueError(f"gate_file: {exc}") from None
        return self

    def gate_path(self) -> Path:
        path = Path(self.gate_file)
        return path if path.is_absolute() or path.exists() else repo_root() / path


class ServeConfig(StrictModel):
    """``alignloop serve`` (``configs/serve.yaml``)."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    gateway_file: str | None = Field(
        None,
        description="A gateway YAML (configs/gateway.yaml); relative paths are from the repo "
        "root. None = use the inline `gateway` section.",
    )
    gateway: GatewayConfig = Field(
        default_factory=GatewayConfig,
        description="Gateway config inline (when gateway_file is None).",
    )
    releases: ReleasesConfig = Field(
        default_factory=ReleasesConfig, description="Release handling."
    )
    log_level: str = Field("info", description="uvicorn log level.")
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Gateway worker processes (the data plane) in front of this process (the "
        "control plane: releases, vLLM, the log writer). 1 = one process does it all; 'auto' = "
        "a quarter of the CPU cores, 1 to 8 (1 on a 2-core machine).",
    )

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("workers: 1..64 or 'auto'")
        return v

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, min(8, (os.cpu_count() or 1) // 4))
        return self.workers
    insecure_demo_keys: bool = Field(
        False,
        description="Serve the published demo keys on a non-loopback address anyway "
        "(`alignloop serve --insecure-demo-keys`).",
    )

    def gateway_config(self) -> GatewayConfig:
        if self.gateway_file is None:
            return self.gateway
        path = Path(self.gateway_file)
        if not path.is_absolute() and not path.exists():
            path = repo_root() / path
        return load_gateway_config(path)


def server_file() -> Path:
    """Where a running ``alignloop serve`` records its URL and pid."""
    return data_dir() / "server.json"


def running_server() -> dict | None:
    """The running gateway's ``{"url", "pid"}`` if its process is alive, else None."""
    try:
        info = json.loads(server_file().read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def _boot_external(manager, cfg: ReleasesConfig) -> None:
    """Serve the configured external upstream: reuse the live release if it is that server,
    else stage it and promote it (forced: the serve config chose it, not the gate)."""
    live = manager.live()
    same = live is not None and (live.upstream_url, live.upstream_model) == (
        cfg.upstream_url, cfg.upstream_model,
    )
    if same and manager.start() is not None:
        return
    rel = manager.stage_external(
        cfg.upstream_url, cfg.upstream_model, cfg.upstream_api_key_env,
        source={"name": "serve config releases.upstream_url"},
    )
    if rel.status != "staged":
        log.error("external upstream %s failed its check: %s", cfg.upstream_url, rel.history[-1].reason)
        return
    manager.promote(rel.release_id, force=True, reason="external upstream named by the serve config")


def _boot(manager, initial_model: str | None, releases: ReleasesConfig | None = None) -> None:
    """Start the persisted live release; with none, stage + promote ``initial_model``."""
    try:
        if releases is not None and releases.upstream_url:
            _boot_external(manager, releases)
            return
        # The initial model is only for a data dir where no release was ever live: when the
        # persisted live and previous releases both fail to start, we say so rather than
        # silently serving something else.
        ever_live = manager.live() is not None or manager.store.previous() is not None
        if manager.start() is not None or ever_live or not initial_model:
            if manager.current() is None:
                log.error("no release is serving; the gateway answers 503 until one is promoted")
            return

        model_dir = resolve_base_model(initial_model)
        rel = manager.stage(model_dir, source={"kind": "initial_model", "name": initial_model})
        if rel.status != "staged":
            log.error("initial model %s failed to start: %s", initial_model, rel.history[-1].reason)
            return
        # Nothing is live to compare against, so there is no gate to pass: recorded as forced.
        manager.promote(rel.release_id, force=True, reason="initial release (no release was live)")
    except ReleaseError as exc:  # shut down during boot
        log.warning("boot interrupted: %s", exc)
    except Exception:  # the gateway keeps running (503) and says why
        log.exception("booting the live release failed")


def _reload_keys(keys) -> None:  # noqa: ANN001 - serving.gateway.auth.KeyRing
    """SIGHUP: re-read the keys file (an invalid one is logged and the old keys stay)."""
    try:
        keys.reload()
    except Exception as exc:  # noqa: BLE001 - a signal handler must not raise into the server
        log.error("SIGHUP: keys file not reloaded, previous keys stay: %s", exc)


def _server_class():
    # lazy: uvicorn, the gateway's server only
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM once it has shut down (uvicorn >= 0.29), which would kill
        this process before it stops its vLLMs; swallow that so ``run_serve`` cleans up and exits."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return _Server


def run_serve(cfg: ServeConfig) -> None:
    """Run the gateway until SIGINT/SIGTERM; stop every vLLM it started on the way out."""
    # lazy: serving.gateway.auth loads fastapi
    from serving.gateway.auth import KeyRing, check_demo_keys

    gw = cfg.gateway_config()
    keys = KeyRing(gw)
    check_demo_keys(keys, cfg.host, cfg.insecure_demo_keys)  # before anything loads or starts
    import_presidio_for_serving()  # before any thread starts (see there)
    # lazy: ground.logstore loads sqlalchemy; serving.control.admin_api loads fastapi; serving.gateway.app loads aiohttp, fastapi, sqlalchemy, starlette, uvicorn; serving.review.page loads aiohttp, fastapi, sqlalchemy, starlette
    from ground.logstore import LogStore, default_url
    from serving.control.admin_api import build_admin_router
    from serving.gateway.app import create_app, uvicorn_config
    from serving.review.page import build_review_router, candidates_of

    _Server = _server_class()
    workers = cfg.worker_count()
    logging.getLogger("httpx").setLevel(
        logging.WARNING
    )  # one INFO line per proxied request otherwise
    store = LogStore(gw.log_store_url or default_url())
    manager = ReleaseManager(
        ReleaseStore(), cfg.releases.grace_s, cfg.releases.default_args, cfg.releases.gate_path(),
        cfg.releases.placement,
    )
    info = server_file()
    plane = None
    try:
        admin = build_admin_router(manager, staging=cfg.releases.staging)
        review = build_review_router(manager.store, candidates_of(manager))  # /review
        app = create_app(gw, manager, store, extra_routers=[admin, review], keyring=keys)
        if workers == 1:
            server = _Server(uvicorn_config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level))
        else:
            # The control plane answers the workers' forwarded requests (admin API, feedback,
            # the review page) on a Unix socket; the workers share the public listening socket
            # (serving.gateway.dataplane).

            uds = str(Path(tempfile.gettempdir()) / f"alignloop-gateway-{os.getpid()}.sock")
            app.state.service.feedback_wait_s = 2.0  # rows in transit from a worker
            plane = ControlPlane(gw, manager, store, cfg.host, cfg.port, workers, uds, cfg.log_level)
            server = _Server(uvicorn_config(app, uds=uds, log_level=cfg.log_level))
            plane.start()
            keys.on_reload(plane.keys_changed)  # SIGHUP, /admin/keys/reload: every worker
            log.info("gateway: %d worker processes on %s:%d", workers, cfg.host, cfg.port)
        signal.signal(signal.SIGHUP, lambda *_: _reload_keys(keys))
        boot = threading.Thread(
            target=_boot,
            args=(manager, cfg.releases.initial_model, cfg.releases),
            name="release-boot",
            daemon=True,
        )
        boot.start()
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps({"url": f"http://{host}:{cfg.port}", "pid": os.getpid()}))
        server.run()  # handles SIGINT/SIGTERM itself, then returns
    finally:
        if plane is not None:
            plane.stop()  # workers finish their streams; their log rows reach the store
        log.info("shutting down: stopping every vLLM this gateway started")
        manager.shutdown()
        store.close()  # the app's lifespan closes it too; closing twice is a no-op
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
