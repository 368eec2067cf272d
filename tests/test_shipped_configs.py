"""Every YAML the project ships loads into its schema (a profile merged over its base), and says
what it is for on line one."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from ground.config import ConfigError, build_config, load_config, read_config_file

REPO = Path(__file__).resolve().parents[1]

# file -> (schema, values for the fields a command line or the loop fills in)
SCHEMAS: dict[str, tuple[str, dict]] = {
    "data.yaml": ("training.data:DataConfig", {}),
    "demo.yaml": ("flows.simulate:SimulateConfig", {}),
    "sft.yaml": ("training.sft:SFTStageConfig", {"dataset_path": "d"}),
    "dpo.yaml": ("training.dpo:DPOStageConfig", {"dataset_path": "d", "sft_adapter": "a"}),
    "kto.yaml": ("training.kto:KTOStageConfig", {"dataset_path": "d", "adapter": "a"}),
    "merge.yaml": ("training.merge:MergeConfig", {"adapter": "a"}),
    "quantize.yaml": ("training.quantize:QuantizeConfig", {"model_dir": "m", "dataset_path": "d"}),
    "evals.yaml": ("evals.config:EvalsConfig", {}),
    "evals-demo.yaml": ("evals.config:EvalsConfig", {}),
    "evals-gpu.yaml": ("evals.config:EvalsConfig", {}),
    "gate.yaml": ("evals.gate:GateConfig", {}),
    "gate-demo.yaml": ("evals.gate:GateConfig", {}),
    "online.yaml": ("evals.online:OnlineConfig", {}),
    "gateway.yaml": ("serving.gateway.config:GatewayConfig", {}),
    "serve.yaml": ("serving.control.server:ServeConfig", {}),
    "serve-gpu.yaml": ("serving.control.server:ServeConfig", {}),
    "loop.yaml": ("flows.loop_config:LoopConfig", {}),
    "loop-gpu.yaml": ("flows.loop_config:LoopConfig", {}),
}


def _schema(ref: str) -> type:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_shipped_yaml_has_a_schema() -> None:
    shipped = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert shipped == set(SCHEMAS), f"add new config files to SCHEMAS: {shipped ^ set(SCHEMAS)}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_shipped_yaml_loads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, f"{name}: line one should say what it is for"
    ref, wired = SCHEMAS[name]
    build_config(_schema(ref), {**read_config_file(path), **wired}, name)


def test_shipped_yaml_rejects_a_typo() -> None:
    with pytest.raises(ConfigError, match="trian"):
        load_config(_schema(SCHEMAS["sft.yaml"][0]), REPO / "configs" / "sft.yaml", ["dataset_path=d", "trian.epochs=1"])


def test_gpu_configs_stay_in_step_with_the_cpu_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/*-gpu.yaml differ from their CPU twins only where a GPU box differs (they are
    profiles of them; this checks what the profiles may change), and the loop plans with the
    gateway's placement."""
    monkeypatch.chdir(REPO)

    def load(name: str) -> Any:  # each file's own schema
        return load_config(_schema(SCHEMAS[name][0]), REPO / "configs" / name)

    def suites(name: str) -> dict:  # quality and safety, less how many requests run at once
        doc = load(name).model_dump()
        return {k: {f: x for f, x in doc[k].items() if f != "num_concurrent"} for k in ("quality", "safety")}

    assert suites("evals-gpu.yaml") == suites("evals.yaml"), "evals-gpu.yaml: suites as evals.yaml's"
    loop = load("loop-gpu.yaml")
    assert loop.placement == load("serve-gpu.yaml").releases.placement, "loop-gpu.yaml: placement as the gateway's"
    assert loop.evals_file == "configs/evals-gpu.yaml"


@pytest.mark.parametrize("path,first_words", [
    ("benchmarks/continual_gate.yaml", "# Measurement-only gate"),
    ("configs/gate-demo.yaml", "# The CPU demo's promotion gate (margins sized for the demo's item budget, NOT a production"),
])
def test_measurement_and_demo_gates_differ_from_the_shipped_one_only_in_margins(path: str, first_words: str) -> None:
    """A gate that is not the production policy gates the same metrics with the same tests, with
    margins no narrower, and says what it is in its first line. The demo's latency rules may
    compare with live's instead of the SLO (a laptop misses the production SLO whatever it
    serves): a candidate as fast as live passes them, one over twice as slow never does."""
    from evals.gate import GateConfig

    path = REPO / path
    assert path.read_text().startswith(first_words)
    bench, shipped = load_config(GateConfig, path), load_config(GateConfig, REPO / "configs" / "gate.yaml")
    key = [(r.metric, r.test, r.op, r.higher_is_better) for r in shipped.rules]
    assert [(r.metric, r.test, r.op, r.higher_is_better) for r in bench.rules] == key
    assert all((b.margin or 0) >= (s.margin or 0) for b, s in zip(bench.rules, shipped.rules, strict=True))
    for b, s in zip(bench.rules, shipped.rules, strict=True):
        if b.ref_metric != s.ref_metric:
            assert "demo" in path.name and b.metric.startswith("perf.") and b.relative_to == "live", b
            assert b.op == "<=" and 1 <= b.scale <= 2 and b.offset == 0, b
