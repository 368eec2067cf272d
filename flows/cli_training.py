"""`alignloop sft|dpo|kto|merge|quantize --config FILE key=value ...`: one training stage each.

Each command loads the stage's typed config (YAML plus dotted ``key=value`` overrides), runs the
stage's ``run(cfg)`` and prints its result as JSON. A stage whose inputs did not change since it
last finished in the same run folder is skipped (``"skipped": true``).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

_STAGES = {
    # command: (module, config class, default config file, help)
    "sft": ("training.sft", "SFTStageConfig", "sft.yaml", "Train the SFT LoRA adapter (TRL SFTTrainer)."),
    "dpo": ("training.dpo", "DPOStageConfig", "dpo.yaml", "Train the DPO LoRA adapter on the SFT model."),
    "kto": ("training.kto", "KTOStageConfig", "kto.yaml", "Train a KTO LoRA adapter on unpaired thumbs up/down."),
    "merge": ("training.merge", "MergeConfig", "merge.yaml", "Fold SFT + DPO adapters into a full model folder."),
    "quantize": ("training.quantize", "QuantizeConfig", "quantize.yaml", "AWQ-quantize a merged model (llm-compressor)."),
}


def _default_config(name: str) -> Path | None:
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.config import repo_root

    path = repo_root() / "configs" / name
    return path if path.is_file() else None


def _make_command(module: str, cls_name: str, default_file: str, help_text: str):
    def command(
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/<command>.yaml).")
        ] = None,
        overrides: Annotated[
            list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=5")
        ] = None,
        curve: Annotated[bool, typer.Option(help="Also print the loss curve.")] = False,
    ) -> None:
        # lazy: a command imports what it runs (alignloop --help stays quick)
        from ground.config import ConfigError, load_config

        mod = importlib.import_module(module)
        try:
            cfg = load_config(getattr(mod, cls_name), config or _default_config(default_file), overrides or [])
            if hasattr(cfg, "launch"):  # SFT, DPO: `accelerate launch` on GPUs (training/launch.py)
                # lazy: a command imports what it runs (alignloop --help stays quick)
                from training.launch import run_stage

                result = asdict(run_stage(module.rsplit(".", 1)[1], cfg))
            else:
                result = asdict(mod.run(cfg))
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if not curve:
            result.pop("loss_curve", None)
        typer.echo(json.dumps(result, indent=2, default=str))

    command.__doc__ = help_text
    return command


def register(app: typer.Typer) -> None:
    """Add the training stage commands to the `alignloop` app."""
    for name, (module, cls_name, default_file, help_text) in _STAGES.items():
        app.command(name, help=help_text)(_make_command(module, cls_name, default_file, help_text))
