"""What the gateway tells a caller without a key: that it is up, and nothing else.

Public: ``GET /healthz`` (status only). Everything else needs a key: ``/v1/*`` a tenant key,
``/admin/*`` the admin key, ``/metrics`` the admin key or a metrics key. No tenant name, release
id or model folder reaches an unauthenticated caller, whatever path it tries.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from test_gateway_support import (
    ADMIN,
    KEY_A,
    FakeUpstream,
    make_config,
    running_fake,
    running_gateway,
)

from serving.gateway.auth import new_key_entry, write_keys_file
from serving.gateway.config import load_key_secret

SECRETS = ("fake-r1", "fake-model", '"a"', 'tenant="a"', "tenant=\"b\"")


def test_unauthenticated_callers_learn_nothing(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    metrics_key, entry = new_key_entry("metrics", None, load_key_secret())
    from serving.gateway.auth import KeysFile

    write_keys_file(keys_file, KeysFile(keys=[entry]))
    cfg = make_config(keys_file=str(keys_file))
    with running_fake(FakeUpstream()) as up, running_gateway(tmp_path, up, cfg) as (base, _, _):
        httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                   json={"model": "alignloop", "messages": [{"role": "user", "content": "hi"}]})
        public = httpx.get(base + "/healthz")
        assert public.status_code == 200 and public.json() == {"status": "ok"}
        probes = [("GET", p) for p in ("/metrics", "/v1/models", "/admin/releases", "/openapi.json",
                                       "/docs", "/redoc", "/", "/v1", "/healthz?verbose=1")]
        probes += [("POST", p) for p in ("/v1/chat/completions", "/v1/feedback", "/admin/keys/reload")]
        for method, path in probes:
            r = httpx.request(method, base + path)
            assert r.status_code in (200, 401, 404, 405), (path, r.status_code)
            assert not any(s in r.text for s in SECRETS), (path, r.text[:300])
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        # The admin sees the details; the metrics key reads /metrics and nothing else.
        admin = {"Authorization": f"Bearer {ADMIN}"}
        details = httpx.get(base + "/healthz", headers=admin).json()
        assert details["upstream"]["release_id"] == "fake-r1" and details["status"] == "ok"
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 403
        m = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"})
        assert m.status_code == 200 and 'tenant="a"' in m.text
        assert httpx.get(base + "/metrics", headers=admin).status_code == 200
        as_tenant = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {metrics_key}"})
        assert as_tenant.status_code == 403
        assert httpx.get(base + "/admin/releases", headers={"Authorization": f"Bearer {metrics_key}"}).status_code in (403, 404)


def test_public_metrics_is_a_choice(tmp_path: Path) -> None:
    with running_gateway(tmp_path, None, make_config(public_metrics=True)) as (base, _, _):
        assert httpx.get(base + "/metrics").status_code == 200
        down = httpx.get(base + "/healthz")
        assert down.status_code == 503 and down.json() == {"status": "unavailable"}
