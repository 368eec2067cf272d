"""The stage packages never import Prefect: flows/ is the only place that knows it (docs/CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["training", "serving", "guardrails", "evals"])
def test_no_prefect_outside_flows(package: str) -> None:
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders, offenders


def test_cli_help_is_fast_and_light() -> None:
    """`alignloop --help` must not import torch/transformers/vllm/prefect (heavy imports inside commands)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom flows.cli import app\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'vllm', 'prefect', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""
