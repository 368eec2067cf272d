"""The alignment loop's config (``configs/loop.yaml``): one section per stage, checked at load.

Each stage section uses that stage's own config class. Fields the loop wires itself (the run
folder, the dataset and adapter paths) are filled in at run time; every other key is validated
when the file is loaded, so a typo fails before any stage runs, naming the field.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from evals.config import EvalsConfig
from evals.gate import GateConfig
from ground.config import (
    ConfigError,
    ModelRef,
    StrictModel,
    build_config,
    load_config,
    merge_dicts,
    read_config_file,
    repo_root,
)
from serving.control.server import running_server
from serving.engine.vllm_server import VLLMArgs
from serving.gateway.config import GatewayConfig
from serving.releases.placement import PlacementConfig
from training.data import DataConfig
from training.dpo import DPOStageConfig
from training.kto import KTOStageConfig
from training.merge import MergeConfig
from training.quantize import QuantizeConfig
from training.sft import SFTStageConfig

# Placeholders that satisfy required path fields while a section is validated at load time.
_WIRED: dict[str, dict[str, Any]] = {
    "sft": {"dataset_path": "<data stage>"},
    "dpo": {"dataset_path": "<data stage>", "sft_adapter": "<sft stage>"},
    "kto": {"dataset_path": "<data stage>", "adapter": "<sft or dpo stage>"},
    "merge": {"adapter": "<last adapter>"},
    "quantize": {"model_dir": "<merge stage>", "dataset_path": "<data stage>"},
}


def stage_class(stage: str) -> type[StrictModel]:
    """The config class of a stage (imported lazily: the classes live with their stages)."""
    if stage == "data":
        return DataConfig
    if stage == "sft":
        return SFTStageConfig
    if stage == "dpo":
        return DPOStageConfig
    if stage == "kto":
        return KTOStageConfig
    if stage == "merge":
        return MergeConfig
    if stage == "quantize":
        return QuantizeConfig
    raise KeyError(stage)


class GatewayTarget(StrictModel):
    """The running gateway (``alignloop serve``) that candidates are staged into."""

    url: str | None = Field(None, description="Gateway root URL; None = the one in <data dir>/server.json.")
    admin_key: str | None = Field(None, description="Admin key; None = read the env var admin_key_env.")
    admin_key_env: str = Field("ALIGNLOOP_ADMIN_KEY", description="Env var holding the admin key.")
    config_file: str = Field(
        "configs/gateway.yaml",
        description="Gateway config whose guardrails the evals put in front of each variant.",
    )


class LoopConfig(StrictModel):
    """The whole loop: data -> sft -> dpo -> merge -> quantize -> stage -> evals -> gate -> promote."""

    model: ModelRef = Field(default_factory=ModelRef, description="Base model the adapters train on.")
    gateway: GatewayTarget = Field(default_factory=GatewayTarget, description="Where releases live.")
    stage_files: dict[str, str] = Field(
        default_factory=lambda: {
            s: f"configs/{s}.yaml" for s in ("data", "sft", "dpo", "kto", "merge", "quantize")
        },
        description="Each stage's own YAML; the loop's section for the stage overrides it.",
    )
    data: dict[str, Any] = Field(default_factory=dict, description="training.data.DataConfig keys.")
    sft: dict[str, Any] = Field(default_factory=dict, description="training.sft.SFTStageConfig keys.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="training.dpo.DPOStageConfig keys.")
    kto: dict[str, Any] = Field(default_factory=dict, description="training.kto.KTOStageConfig keys.")
    merge: dict[str, Any] = Field(default_factory=dict, description="training.merge.MergeConfig keys.")
    quantize: dict[str, Any] = Field(
        default_factory=dict, description="training.quantize.QuantizeConfig keys."
    )
    start_from: Literal["base", "live"] = Field(
        "base",
        description="Train from the base model (on every window to date) or continue from the live "
        "release's weights (on the windows it has not learned from); docs/continual.md.",
    )
    preference_objective: Literal["dpo", "kto", "dpo+kto"] = Field(
        "dpo",
        description="After SFT: DPO on pairs; KTO on thumbs up/down and the pairs unpaired; or DPO "
        "then KTO on the thumbs.",
    )
    candidates: list[Literal["aligned", "quantized"]] = Field(
        default_factory=lambda: ["aligned", "quantized"],
        description="Which variants to stage and evaluate against the live release.",
    )
    candidate_args: VLLMArgs = Field(
        default_factory=VLLMArgs, description="vLLM arguments of staged candidates."
    )
    kernels: list[Literal["default", "marlin"]] = Field(
        default_factory=lambda: ["default", "marlin"], min_length=1,
        description="vLLM kernels a W4A16 candidate is staged and measured with on a GPU (one "
        "release each; the serving choice picks); other schemes and CPUs use the default.",
    )
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig,
        description="GPU sharing rules for training beside the gateway's releases (use the gateway's).",
    )
    workload_concurrency: int | None = Field(
        None, ge=1,
        description="Requests in flight the serving choice plans for; None = what the window's logs show.",
    )
    evals_file: str = Field("configs/evals.yaml", description="Eval suites config.")
    gate_file: str = Field("configs/gate.yaml", description="Promotion gate policy.")
    promote: bool = Field(True, description="Promote the best passing candidate (false: report only).")
    canary: bool = Field(
        False, description="Stage the gate's winner as a canary (a share of users, decided by the online "
        "rules of online_file) instead of promoting it; docs/ONLINE.md.",
    )
    online_file: str = Field("configs/online.yaml", description="Online rules and canary settings.")

    @model_validator(mode="after")
    def _check_sections(self) -> LoopConfig:
        unknown = set(self.stage_files) - {"data", *_WIRED}
        if unknown:
            raise ValueError(f"stage_files: unknown stages {sorted(unknown)}")
        for stage in ("data", *_WIRED):
            if "run_dir" in getattr(self, stage):
                raise ValueError(f"{stage}.run_dir is set by the loop (one folder per data window)")
            build_config(stage_class(stage), {**self.section(stage), **_WIRED.get(stage, {})}, f"section {stage!r}")
        self._check_files()
        return self

    def _check_files(self) -> None:
        """Every config the run will read, loaded now: a typo in the gate or eval config fails
        before SFT, DPO, merge and AWQ have spent their time (the error names file and field)."""
        # lazy: evals.online loads numpy, scipy
        from evals.online import OnlineConfig

        for field, cls, name in (("evals_file", EvalsConfig, self.evals_file),
                                 ("gate_file", GateConfig, self.gate_file),
                                 ("online_file", OnlineConfig, self.online_file),
                                 ("gateway.config_file", GatewayConfig, self.gateway.config_file)):
            path = resolve_path(name)
            if not path.is_file():
                raise ValueError(f"{field}: file not found: {name}")
            try:
                load_config(cls, path)
            except ConfigError as exc:
                raise ValueError(f"{field} ({name}): {exc}") from None

    def section(self, stage: str) -> dict[str, Any]:
        """The stage's YAML (``stage_files``) with the loop's section for it on top."""
        base: dict[str, Any] = {}
        if file := self.stage_files.get(stage):
            path = resolve_path(file)
            if not path.is_file():
                raise ValueError(f"stage_files.{stage}: file not found: {file}")
            base = read_config_file(path)
        own = getattr(self, stage)
        section = merge_dicts(base, own)
        if stage == "sft" and "model" not in own:  # the base model is named once, at the top
            section["model"] = self.model.model_dump()
        return section

    def stage_config(self, stage: str, **wired: Any) -> StrictModel:
        """The stage's config: its section plus the wired paths (run folder, inputs)."""
        return build_config(stage_class(stage), merge_dicts(self.section(stage), wired), f"section {stage!r}")


def resolve_path(name: str | Path) -> Path:
    """Relative config paths are taken from the working directory, then from the repo root."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return repo_root() / path


def load_loop_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> LoopConfig:
    """Load configs/loop.yaml (or ``path``) with overrides; errors name the field."""
    try:
        return load_config(LoopConfig, resolve_path(path) if path else None, overrides)
    except ConfigError:
        raise
    except ValueError as err:  # raised by a section's own validation inside the validator
        raise ConfigError(str(err)) from None


@contextlib.contextmanager
def admin_client(cfg: LoopConfig) -> Iterator[Any]:
    """An admin client for the running gateway named by the config (or ``server.json``)."""
    # lazy: serving.control.admin_api loads fastapi
    from serving.control.admin_api import AdminClient

    url = cfg.gateway.url
    if url is None:
        info = running_server()
        if info is None:
            raise RuntimeError(
                "no running gateway: start one with `alignloop serve` or set gateway.url in the loop config"
            )
        url = info["url"]
    key = cfg.gateway.admin_key or os.environ.get(cfg.gateway.admin_key_env)
    if not key:
        raise RuntimeError(f"no admin key: set gateway.admin_key or ${cfg.gateway.admin_key_env}")
    client = AdminClient(url, key)
    try:
        yield client
    finally:
        client.close()
