"""A gateway in front of one staged release, for its evals (the product path, before promotion)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from evals.config import Endpoint
from ground.config import repo_root
from ground.logstore import LogStore
from serving.gateway.app import create_app, serve_in_thread
from serving.gateway.config import TenantConfig, hash_key, load_gateway_config
from serving.gateway.upstream import StaticUpstream, Upstream


@contextlib.contextmanager
def candidate_gateway(
    vllm_base_url: str, served_model: str, release_id: str, store_url: str,
    gateway_config: str | Path | None = None,
) -> Iterator[Endpoint]:
    """A gateway (same guardrails as production) in front of one release that is not live yet.

    The production gateway routes only to the live release; a staged candidate is evaluated
    through its own in-process gateway built from the same config, with a one-off tenant key,
    so the chat template and guardrails are in the path exactly as they will be after promotion.
    Exchanges go to ``store_url`` (keep them out of the production log store: they are evals).
    """
    cfg = load_gateway_config(gateway_config or repo_root() / "configs" / "gateway.yaml")
    key = "sk-evals-" + secrets.token_hex(12)
    cfg = cfg.model_copy(update={  # one private tenant; the demo keys have no business here
        "tenants": [TenantConfig(name="evals", key_hash=hash_key(key), max_in_flight=256)],
        "demo_keys": False,
    })
    upstream = StaticUpstream(Upstream(base_url=vllm_base_url, release_id=release_id, served_model=served_model))
    with serve_in_thread(create_app(cfg, upstream, LogStore(store_url))) as base:
        yield Endpoint(base + "/v1", key, cfg.public_models[0])
