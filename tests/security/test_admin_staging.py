"""An admin key deploys models; it does not run code on the host. The admin API stages only model
folders under the server's roots with vLLM arguments its config allows, and its bodies are
size-limited. It does not approve releases (a reviewer does), and what it forces is recorded with
the key that forced it.

The requests here are refused before any vLLM would start; the one that is allowed names a
folder that does not exist, so the release manager records it as failed without starting one.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from test_gateway_support import ADMIN, FakeUpstream, make_config, running_fake, running_gateway

from ground.config import ConfigError, build_config
from serving.control.admin_api import build_admin_router
from serving.engine.vllm_server import VLLMArgs
from serving.releases.manager import ReleaseManager
from serving.releases.staging import (
    DEFAULT_ALLOWED_ARGS,
    SERVER_ONLY_ARGS,
    StagingError,
    StagingPolicy,
)
from serving.releases.store import ReleaseStore

H = {"Authorization": f"Bearer {ADMIN}"}
DEFAULTS = VLLMArgs(max_model_len=2048)


def test_every_vllm_argument_is_classified() -> None:
    """A new VLLMArgs field must be placed: settable through the admin API, or server-only."""
    assert set(VLLMArgs.model_fields) == set(DEFAULT_ALLOWED_ARGS) | set(SERVER_ONLY_ARGS)


@pytest.fixture
def roots(data_home: Path) -> Path:
    model = data_home / "runs" / "r1" / "merge" / "output"
    model.mkdir(parents=True)
    return model


def test_policy(roots: Path, tmp_path: Path) -> None:
    policy = StagingPolicy()
    assert policy.check(str(roots), VLLMArgs(max_model_len=1024, tensor_parallel_size=2), DEFAULTS) == str(roots)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = roots.parent / "sneaky"
    link.symlink_to(outside)  # a link inside the roots that leads out
    refused = {
        "model_dir": [(str(outside), None), (str(link), None), (str(roots / ".." / ".." / ".." / ".."), None),
                      ("evil-org/backdoored-model", None)],
        "args.env": [(str(roots), VLLMArgs(env={"LD_PRELOAD": "/tmp/x.so"}))],
        "args.extra_args": [(str(roots), VLLMArgs(extra_args=["--trust-remote-code"])),
                            (str(roots), VLLMArgs(extra_args=["--enable-prefix-caching"])),
                            (str(roots), VLLMArgs(extra_args=["model.py"]))],
    }
    for field, cases in refused.items():
        for model_dir, args in cases:
            with pytest.raises(StagingError) as err:
                policy.check(model_dir, args, DEFAULTS)
            assert err.value.field == field, (model_dir, args)
    # What the server's config allows, it allows; code-loading flags and variables never.
    policy.check(str(roots), VLLMArgs(env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}), DEFAULTS)
    wider = StagingPolicy(allowed_flags=["--enable-prefix-caching"], allowed_env=["VLLM_DISABLED_KERNELS"])
    wider.check(str(roots), VLLMArgs(extra_args=["--enable-prefix-caching"],
                                     env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}), DEFAULTS)
    for bad in ({"allowed_env": ["LD_PRELOAD"]}, {"allowed_env": ["PYTHONPATH"]},
                {"allowed_flags": ["--trust-remote-code"]}, {"allowed_args": ["env"]},
                {"allowed_args": ["no_such_field"]}):
        with pytest.raises(ConfigError):
            build_config(StagingPolicy, bad)
    # A folder a release of this server already has (live's, for a baseline copy) may be staged again.
    assert policy.check(str(outside), None, DEFAULTS, known=[str(outside)]) == str(outside.resolve())
    # The server's own default_args may carry anything: equal to them is never refused.
    own = VLLMArgs(env={"VLLM_CPU_OMP_THREADS_BIND": "all"}, extra_args=["--seed", "1"])
    policy.check(str(roots), own, own)


def test_loop_candidate_args_are_allowed(roots: Path) -> None:
    """What the loop stages (configs/loop.yaml candidate_args) passes the shipped policy."""
    from flows.loop_config import LoopConfig
    from ground.config import load_config, repo_root
    from serving.control.server import ServeConfig

    serve = load_config(ServeConfig, repo_root() / "configs" / "serve.yaml")
    loop = load_config(LoopConfig, repo_root() / "configs" / "loop.yaml", ["candidate_args.max_model_len=1024"])
    serve.releases.staging.check(str(roots), loop.candidate_args, serve.releases.default_args)


def test_admin_api_refuses_what_the_policy_does_not_allow(roots: Path, tmp_path: Path, data_home: Path) -> None:
    manager = ReleaseManager(ReleaseStore(), grace_s=0, default_args=DEFAULTS)
    cfg = make_config(limits={"max_admin_body_bytes": 64_000})
    try:
        with running_gateway(tmp_path, None, cfg, [build_admin_router(manager)]) as (base, _, _):
            def stage(body: dict) -> httpx.Response:
                return httpx.post(base + "/admin/releases", json=body, headers=H, timeout=60)

            cases = {
                "model_dir": {"model_dir": str(tmp_path)},
                "args.env": {"model_dir": str(roots), "args": {"env": {"LD_PRELOAD": "/tmp/evil.so"}}},
                "args.extra_args": {"model_dir": str(roots), "args": {"extra_args": ["--trust-remote-code"]}},
            }
            for param, body in cases.items():
                r = stage(body)
                assert r.status_code == 403, r.text
                assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "permission_error"
            assert manager.list() == []  # nothing recorded, nothing started
            # allowed: a folder under the roots (empty here: it fails to start, no vLLM runs)
            ok = stage({"model_dir": str(roots / "missing"), "args": {"max_model_len": 1024}, "release_id": "m"})
            assert ok.status_code == 200 and ok.json()["status"] == "failed"
            # bodies are size-limited, with or without a declared length
            big = {"model_dir": str(roots), "source": {"x": "y" * 100_000}}
            r = stage(big)
            assert r.status_code == 413 and "max_admin_body_bytes" in r.json()["error"]["message"]

            def chunks():  # noqa: ANN202
                yield b'{"model_dir": "' + b"a" * 70_000
                yield b'"}'

            r = httpx.post(base + "/admin/releases/m/eval", content=chunks(), headers=H)
            assert r.status_code == 413
            r = httpx.post(base + "/admin/releases/m/eval", json={"report": {"ok": 1}}, headers=H)
            assert r.status_code == 200  # a body under the limit still reaches the route
    finally:
        manager.shutdown()


def test_the_admin_key_cannot_approve_and_what_it_forces_names_it(tmp_path: Path, data_home: Path) -> None:
    """The admin key is the loop's own: an approval it could record would satisfy require_approval
    by the automation that rule checks. A forced promotion is recorded as forced, by that key."""
    fake = FakeUpstream()
    fake.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake-model"}]})  # health check
    with running_fake(fake) as up, ReleaseManager(ReleaseStore(), grace_s=600) as manager:
        for rid in ("one", "two"):  # external releases: health-checked, no vLLM started
            manager.stage_external(up.base_url, "fake-model", release_id=rid)
        with running_gateway(tmp_path, None, make_config(), [build_admin_router(manager)]) as (base, _, _):
            r = httpx.post(base + "/admin/releases/two/approve", json={"note": "ci"}, headers=H)
            assert r.status_code == 403 and r.json()["error"]["code"] == "approval_needs_reviewer"
            assert manager.get("two").approvals == []
            r = httpx.post(base + "/admin/releases/one/promote", json={}, headers=H, timeout=60)
            assert r.status_code == 409 and "no passing gate decision" in r.json()["error"]["message"]
            r = httpx.post(base + "/admin/releases/one/promote", headers=H, timeout=60,
                           json={"force": True, "reason": "first release: nothing to compare with"})
            assert r.status_code == 200, r.text
            last = manager.get("one").history[-1]
            assert (last.status, last.forced, last.by) == ("live", True, "admin")
