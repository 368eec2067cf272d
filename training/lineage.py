"""Lineage of a release, read from run folders, and where the next run's training starts.

A merged model lives at ``<run>/merge/output/model`` and its ``result.json`` names the base it
was merged into; a quantized one at ``<run>/quantize/output/model`` names its source model. So
the chain behind any release is a walk over folders (no database to keep in sync):

    release -> model (quantized? -> its merged source) -> merge result: base + adapters
      -> data result of the same run: dataset version + the ledger windows it trained on
      -> the base: the original model, or an earlier run's merged model (walk on)

``start_from`` picks the model the next run trains on:

- ``base``: the configured base model, retrained on the mix the data stage builds (typically all
  windows to date);
- ``live``: the live release's full-precision weights (its merged model even when an int8 copy is
  what serves), continued on new windows (those not in the live lineage's datasets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.lora import is_quantized

StartFrom = Literal["base", "live"]


@dataclass
class LineageStep:
    """One run in a model's lineage: the window, the dataset, the adapters, the merged model."""

    run_dir: str
    window: str
    dataset_version: str | None
    windows: list[str]
    adapters: list[str]
    model_dir: str
    base_model: str


@dataclass
class Lineage:
    """A release's chain, newest step first, down to the model no run of ours produced."""

    release_id: str | None
    serving_model: str
    full_model: str
    steps: list[LineageStep] = field(default_factory=list)
    root_model: str = ""

    @property
    def trained_windows(self) -> list[str]:
        """Every ledger window whose rows went into some training split of this lineage."""
        seen: dict[str, None] = {}
        for step in reversed(self.steps):
            seen.update(dict.fromkeys(step.windows))
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trained_windows": self.trained_windows}


def _stage_of(model_dir: Path) -> Path | None:
    """``<run>/<stage>`` when ``model_dir`` is a stage's ``output/model`` with a finished result."""
    stage = model_dir.parent.parent
    if model_dir.name == "model" and model_dir.parent.name == "output" and (stage / "result.json").is_file():
        return stage
    return None


def full_precision_model(model_dir: str | Path) -> Path:
    """The trainable weights behind a served model: itself, or the source of a quantize stage.

    Raises:
        ValueError: a quantized model that no quantize stage folder explains.
    """
    path = Path(model_dir).resolve()
    if not is_quantized(path):
        return path
    stage = _stage_of(path)
    if stage is None or stage.name != "quantize":
        raise ValueError(
            f"{path} is quantized and not the output of a quantize stage, so its full-precision "
            "weights are unknown; start_from=base, or serve the full-precision model"
        )
    return Path(json.loads((stage / "result.json").read_text())["source_model"]).resolve()


def _data_of(run: Path) -> tuple[str | None, list[str]]:
    """(dataset version, windows with rows in a training split) from a run's data manifest."""
    result = run / "data" / "result.json"
    if not result.is_file():
        return None, []
    manifest_path = json.loads(result.read_text()).get("manifest_path")
    if not manifest_path or not Path(manifest_path).is_file():
        return None, []
    ledger = json.loads(Path(manifest_path).read_text()).get("ledger") or {}
    return ledger.get("dataset_version"), list(ledger.get("train_windows", []))


def model_lineage(model_dir: str | Path) -> tuple[list[LineageStep], Path]:
    """The runs behind a full-precision model, newest first, and the model at the root."""
    steps: list[LineageStep] = []
    current = Path(model_dir).resolve()
    seen: set[Path] = set()
    while (stage := _stage_of(current)) is not None and stage.name == "merge" and current not in seen:
        seen.add(current)
        merged = json.loads((stage / "result.json").read_text())
        run = stage.parent
        version, windows = _data_of(run)
        steps.append(LineageStep(
            run_dir=str(run), window=run.name, dataset_version=version, windows=windows,
            adapters=list(merged.get("adapters", [])), model_dir=str(current),
            base_model=str(merged["base_model"]),
        ))
        current = Path(merged["base_model"]).resolve()
    return steps, current


def release_lineage(release_id: str | None, model_dir: str | Path) -> Lineage:
    """The chain behind a release serving ``model_dir`` (window -> dataset -> adapters -> release)."""
    full = full_precision_model(model_dir)
    steps, root = model_lineage(full)
    return Lineage(
        release_id=release_id, serving_model=str(model_dir), full_model=str(full),
        steps=steps, root_model=str(root),
    )


def describe_chain(lineage: Lineage) -> str:
    """One line: ``w-B (ds-.., sft+dpo) <- w-A (ds-.., sft+dpo) <- base <folder>``, newest first."""
    parts = []
    for step in lineage.steps:
        kinds = "+".join(Path(a).parent.parent.name for a in step.adapters) or "no adapters"
        parts.append(f"{step.window} ({step.dataset_version or 'dataset ?'}, {kinds})")
    return " <- ".join([*parts, f"base {lineage.root_model}"])


@dataclass
class StartPoint:
    """Where a run's training starts, and why."""

    start_from: StartFrom
    model: str
    live_release: str | None
    lineage: list[dict[str, Any]]

    def describe(self) -> str:
        if self.start_from == "base":
            return f"retrain from the base model {self.model}"
        depth = len(self.lineage)
        return (f"continue from live release {self.live_release} ({self.model}; "
                f"{depth} earlier run{'s' if depth != 1 else ''} in its lineage)")


def resolve_start(start_from: StartFrom, base_model: str, live: Lineage | None) -> StartPoint:
    """The model the next run trains on.

    Args:
        start_from: ``base`` (the configured base model) or ``live`` (the live release's weights).
        base_model: the configured base (``embedded``, a folder or a hub id).
        live: the live release's lineage (:func:`live_lineage`).

    Raises:
        ValueError: ``live`` without a live release, or a live model whose weights are unknown.
    """
    if start_from == "base":
        return StartPoint("base", base_model, live.release_id if live else None, [])
    if live is None:
        raise ValueError("start_from=live: no release is live (start the gateway, or start_from=base)")
    return StartPoint("live", live.full_model, live.release_id, [asdict(s) for s in live.steps])
