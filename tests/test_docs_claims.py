"""Claims the README and docs/SECURITY.md make about behaviour, checked against the code."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from typer.main import get_command

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SECURITY = (REPO / "docs" / "SECURITY.md").read_text()


def test_no_access_log_as_security_md_says() -> None:
    """SECURITY.md: `alignloop serve` writes no access log (gateway and workers), vLLM neither."""
    from ground.platform import Platform
    from serving.engine.vllm_server import VLLMArgs, build_command
    from serving.gateway.app import uvicorn_config
    from serving.gateway.config import load_gateway_config

    assert "`alignloop serve` writes no access log" in SECURITY
    assert "writes uvicorn's access log" not in SECURITY
    gateway = load_gateway_config(REPO / "configs" / "gateway.yaml")
    config = uvicorn_config(SimpleNamespace(state=SimpleNamespace(config=gateway)), port=1)
    assert config.access_log is False  # the one config the gateway and its workers run with
    cmd, _ = build_command("/m", 1, VLLMArgs(), "m", Platform("cpu", frozenset({"avx2"}), 2, 8.0))
    assert "--disable-uvicorn-access-log" in cmd


def test_readme_cli_block_lists_every_command() -> None:
    from flows.cli import app

    block = README.split("## The CLI", 1)[1].split("```", 2)[1]
    listed = {name for names in re.findall(r"\balignloop ([\w-]+(?:\|[\w-]+)*)", block)
              for name in names.split("|")}  # `alignloop sft|dpo|kto` names three
    commands = set(get_command(app).commands)
    assert commands <= listed, commands - listed


def test_readme_serve_command_and_address_are_real() -> None:
    """After the demo: `make serve` runs `alignloop serve`, on the address the README gives."""
    from ground.config import load_config
    from serving.control.server import ServeConfig

    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^serve: .*\n\t\$\(VENV\)/bin/alignloop serve$", makefile, re.M)
    cfg = load_config(ServeConfig, REPO / "configs" / "serve.yaml")
    address = f"{cfg.host}:{cfg.port}"
    assert "make serve" in README and f"http://{address}/review" in README
    assert "alignloop stop" in README and "Ctrl-C stops it" in README


def test_readme_keeps_history_out() -> None:
    """Dated results of earlier gates live in docs/HISTORY.md, not in the README."""
    assert (REPO / "docs" / "HISTORY.md").is_file() and "docs/HISTORY.md" in README
    for old in ("62.7%", "8-point rule", "promote quantized", "before the paired gate"):
        assert old not in README, old


def test_every_alignloop_command_in_the_docs_exists() -> None:
    """Each `alignloop CMD [SUB] --option` written in the README or docs/ (a code line, or inline
    code) names a real command, subcommand and option of the CLI."""
    from flows.cli import app

    root = get_command(app)
    wrong = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(r"(?:^|`|\.venv/bin/)alignloop ([a-z][\w-]*)( [a-z][\w-]*)?([^`\n]*)",
                             doc.read_text(), re.M):
            name, sub, rest = m.group(1), (m.group(2) or "").strip(), m.group(3)
            cmd = getattr(root, "commands", {}).get(name)
            if cmd is None:
                wrong.append(f"{doc.name}: {m.group(0)!r}: no command {name!r}")
                continue
            subs = getattr(cmd, "commands", None)
            if subs is not None and sub and "|" not in rest[:1] and sub not in subs:
                wrong.append(f"{doc.name}: {m.group(0)!r}: no subcommand {sub!r}")
            cmd = subs.get(sub, cmd) if subs else cmd
            known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            wrong += [f"{doc.name}: {m.group(0)!r}: no option {o}"
                      for o in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("|")[0]) if o not in known]
    assert not wrong, "\n".join(wrong)
