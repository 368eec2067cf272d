"""API keys: stored as keyed HMACs, compared in constant time, rotated without a restart; the
published demo keys refused on any address other machines can reach.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_gateway_support import FakeUpstream, make_config, running_fake, running_gateway

from ground.config import ConfigError, load_config
from serving.engine.vllm_server import free_port
from serving.gateway.auth import (
    KeyRing,
    check_demo_keys,
    is_loopback,
    new_key_entry,
    read_keys_file,
    write_keys_file,
)
from serving.gateway.config import (
    DEMO_ADMIN_KEY,
    DEMO_TENANT_KEY,
    GatewayConfig,
    hash_key,
    load_gateway_config,
    load_key_secret,
)

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "alignloop", "messages": [{"role": "user", "content": "hi"}]}


def _status(base: str, key: str, path: str = "/v1/models") -> int:
    return httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_leaked_config_does_not_give_away_a_weak_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    weak = "password1"
    stored = hash_key(weak)
    assert weak not in stored and hashlib.sha256(weak.encode()).hexdigest() not in stored
    # Without the server's secret a guess cannot be checked: another secret gives another digest.
    assert hash_key(weak, b"x" * 32) != stored and hash_key(weak, b"y" * 32) != hash_key(weak, b"x" * 32)
    # Plain SHA-256 digests (what a fast offline guess would match) are refused at load.
    with pytest.raises(ConfigError, match="no longer accepted"):
        load_config(GatewayConfig, None, [f"admin_key_sha256={hashlib.sha256(weak.encode()).hexdigest()}"])
    # A gateway with another secret refuses the config, naming the secret mismatch.
    monkeypatch.setenv("ALIGNLOOP_KEY_SECRET", "z" * 40)
    with pytest.raises(ConfigError, match="hashed with key secret"):
        KeyRing(GatewayConfig(admin_key_hash=stored))
    # The secret file is created once, private to the owner.
    monkeypatch.delenv("ALIGNLOOP_KEY_SECRET")
    secret = load_key_secret(tmp_path / "secret", create=True)
    assert load_key_secret(tmp_path / "secret") == secret and len(secret) >= 32
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0


def test_keys_compare_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The match goes through hmac.compare_digest, on digests the caller cannot choose."""
    import serving.gateway.auth as auth

    calls: list[tuple[str, str]] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    keys = KeyRing(make_config())
    assert keys.authenticate("sk-tenant-a").tenant == "a" and calls and calls[-1][0] == calls[-1][1]
    assert keys.authenticate("sk-tenant-a ") is None and keys.authenticate("") is None


def test_rotation_without_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys.yaml"
    cfg = make_config(keys_file=str(keys_file))
    secret = load_key_secret()
    with running_fake(FakeUpstream()) as up, running_gateway(tmp_path, up, cfg) as (base, _, _):
        old_key, old = new_key_entry("tenant", "a", secret)
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [old]}))
        time.sleep(1.1)  # the file is checked at most once a second
        assert _status(base, old_key) == 200
        # Rotate: add the new key, move clients, revoke the old one. No restart.
        new_key, new = new_key_entry("tenant", "a", secret)
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [old, new]}))
        time.sleep(1.1)
        assert _status(base, old_key) == 200 and _status(base, new_key) == 200
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [new]}))
        time.sleep(1.1)
        assert _status(base, old_key) == 401 and _status(base, new_key) == 200
        # An admin call reloads at once; an invalid file is refused and the keys in force stay.
        admin_key, admin = new_key_entry("admin", None, secret)
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [new, admin]}))
        r = httpx.post(base + "/admin/keys/reload", headers={"Authorization": "Bearer sk-admin"})
        assert r.status_code == 200 and r.json()["keys"]["admin"] == 2
        keys_file.write_text(yaml.safe_dump({"keys": [{"id": "x", "role": "tenant", "tenant": "nobody",
                                                       "hash": new.hash}]}))
        r = httpx.post(base + "/admin/keys/reload", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 400 and "nobody" in r.json()["error"]["message"]
        time.sleep(1.1)
        assert _status(base, new_key) == 200  # the previous keys stay in force


def test_demo_keys_only_on_loopback(tmp_path: Path) -> None:
    shipped = load_gateway_config(REPO / "configs" / "gateway.yaml")
    keys = KeyRing(shipped)
    assert keys.tenant(DEMO_TENANT_KEY) == "demo" and keys.is_admin(DEMO_ADMIN_KEY)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_demo_keys(keys, host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "gateway.example.com"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="alignloop keys new"):
            check_demo_keys(keys, host)
        check_demo_keys(keys, host, insecure_demo_keys=True)
    # A config that hashed a published key itself is caught too.
    copied = GatewayConfig(tenants=[{"name": "t", "key_hash": hash_key(DEMO_TENANT_KEY)}])
    with pytest.raises(ConfigError, match="published demo keys"):
        check_demo_keys(KeyRing(copied), "0.0.0.0")
    check_demo_keys(KeyRing(make_config()), "0.0.0.0")  # own keys: any address


def test_reviewer_keys_follow_the_same_scheme(tmp_path: Path) -> None:
    """The review page signs in through the same key ring: keyed hashes, the keys file, and the
    published demo reviewer key only where the demo keys are allowed."""
    from serving.review.session import reviewer_for_key

    shipped = load_gateway_config(REPO / "configs" / "gateway.yaml")
    assert reviewer_for_key(shipped, "sk-alignloop-reviewer").name == "demo-reviewer"
    assert reviewer_for_key(shipped, DEMO_TENANT_KEY) is None  # a tenant key is not a reviewer's
    assert "demo-reviewer" in {p.key_id for p in KeyRing(shipped).demo_principals()}
    keys_file = tmp_path / "keys.yaml"
    cfg = shipped.model_copy(update={"demo_keys": False, "keys_file": str(keys_file)})
    key, entry = new_key_entry("reviewer", None, load_key_secret(), reviewer="demo-reviewer")
    write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [entry]}))
    assert reviewer_for_key(cfg, "sk-alignloop-reviewer") is None  # demo keys off
    assert reviewer_for_key(cfg, key).name == "demo-reviewer"
    with running_gateway(tmp_path, None, cfg) as (base, _, _):
        assert _status(base, key) == 403  # a reviewer key is for /review only


def _serve(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "ALIGNLOOP_HOME": str(tmp_path / "home")}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", *args, "releases.initial_model=null",
         "log_level=warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.integration  # starts `alignloop serve`
def test_serve_refuses_demo_keys_on_a_public_address(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "host=0.0.0.0", f"port={free_port()}")
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("`alignloop serve host=0.0.0.0` with the demo keys kept running") from None
    assert proc.returncode == 2 and "published demo keys" in out and "alignloop keys new" in out


@pytest.mark.integration  # starts `alignloop serve`
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_loopback_reloads_keys_on_sighup(tmp_path: Path, workers: int) -> None:
    """`alignloop serve` (no release: nothing to start) takes a key added to its keys file on
    SIGHUP and drops a revoked one on POST /admin/keys/reload, in every gateway worker; the demo
    keys work on loopback."""
    port = free_port()
    keys_file = tmp_path / "keys.yaml"
    proc = _serve_with_keys_file(tmp_path, port, keys_file, f"workers={workers}")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert _status(base, DEMO_TENANT_KEY) == 200
        key, entry = new_key_entry("tenant", "demo", load_key_secret())
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": [entry]}))
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # well inside the once-a-second file check: this is SIGHUP's doing
        # each call a new connection: with two workers, the kernel spreads them over both
        assert [_status(base, key) for _ in range(20)] == [200] * 20
        write_keys_file(keys_file, read_keys_file(keys_file).model_copy(update={"keys": []}))
        r = httpx.post(base + "/admin/keys/reload", headers={"Authorization": f"Bearer {DEMO_ADMIN_KEY}"})
        assert r.status_code == 200 and r.json()["keys"].get("tenant") == 1  # the demo key only
        assert [_status(base, key) for _ in range(20)] == [401] * 20
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_reload_in_the_control_plane_reaches_the_workers(tmp_path: Path) -> None:
    """The control plane's key reload (SIGHUP, /admin/keys/reload) bumps a counter in the state
    the workers share; a worker's next authentication sees it and rebuilds its key ring. Here a
    worker's view of that state in this process; the test above runs real worker processes."""
    import shutil

    from serving.gateway.dataplane import ControlPlane, SharedUpstream
    from serving.gateway.upstream import StaticUpstream, Upstream

    class Manager(StaticUpstream):
        def on_switch(self, fn) -> None:  # noqa: ANN001
            pass

    from ground.logstore import LogStore

    cfg = make_config()
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")  # the plane counts its workers' drops there
    plane = ControlPlane(cfg, Manager(Upstream("http://127.0.0.1:9/v1", "r1", "m")), store,
                         "127.0.0.1", free_port(), 2, str(tmp_path / "cp.sock"))
    rebuilt: list[GatewayConfig] = []
    worker = SharedUpstream(plane.state, rebuilt.append)  # a worker's reader of the shared state
    try:
        worker.current()
        worker.current()
        assert len(rebuilt) == 1  # the first read only
        keys = KeyRing(cfg)
        keys.on_reload(plane.keys_changed)  # as `alignloop serve` wires it
        keys.reload()
        assert worker.current().release_id == "r1" and len(rebuilt) == 2
    finally:
        plane.sock.close()
        plane.state.close()
        plane.log_queue.close()
        store.close()
        shutil.rmtree(plane.metrics_dir, ignore_errors=True)


def _serve_with_keys_file(tmp_path: Path, port: int, keys_file: Path, *args: str) -> subprocess.Popen:
    cfg = yaml.safe_load((REPO / "configs" / "gateway.yaml").read_text())
    cfg["keys_file"] = str(keys_file)
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    return _serve(tmp_path, f"port={port}", f"gateway_file={tmp_path / 'gateway.yaml'}", *args)
