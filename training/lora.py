"""Parts shared by the SFT, DPO and KTO stages: LoRA and trainer settings, dataset loading,
metrics, adapter lineage.

Our configs are converted to PEFT's ``LoraConfig`` and TRL's ``SFTConfig``/``DPOConfig``/
``KTOConfig`` by plain functions (never subclasses), so our schema survives their releases. Device
choices follow the platform: on a CPU, float32 weights and ``bf16=False`` (TRL defaults to bf16,
which is 10-20x slower on a CPU without native bf16 matmuls; docs/PLATFORM.md), and no gradient
checkpointing (TRL defaults it on; it trades ~20% speed for memory we do not need for LoRA on
small models).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel, data_dir
from ground.runs import new_run_id

log = logging.getLogger(__name__)

ADAPTER_LINEAGE = "alignloop_adapter.json"
"""Written beside each adapter: the base model and the adapters merged under it (in order)."""


class LoraSettings(StrictModel):
    """The LoRA adapter trained by a stage (PEFT ``LoraConfig``)."""

    rank: int = Field(16, ge=1, description="LoRA rank r (adapter width).")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' (every linear but the output head) or names."
    )


class TrainSettings(StrictModel):
    """Optimisation and batching, mapped onto TRL's config by :func:`trainer_kwargs`."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = run all epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (LoRA takes higher rates than full tuning).")
    batch_size: int = Field(4, ge=1, description="Rows per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=16, description="Longest tokenized row (prompt + answer); longer rows are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate schedule.")
    seed: int = Field(0, description="Seed for LoRA init, shuffling and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log loss every N steps (the loss curve's resolution).")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None = all cores.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (saves memory, ~20% slower)."
    )
    liger_kernel: bool | None = Field(
        False,
        description="Liger's Triton kernels for the model's layers (RMSNorm, RoPE, SwiGLU) through TRL's "
        "use_liger_kernel; None = on when training on a GPU with liger-kernel installed. Never on a CPU. "
        "Off by default until a GPU run has measured it (issue 26's plan sets it per run).",
    )


def preference_train_settings() -> TrainSettings:
    """The ``train:`` defaults of DPO and KTO: the policy moves away from a reference it starts
    equal to, so a lower rate than SFT's."""
    return TrainSettings(learning_rate=5e-5, batch_size=4)


def to_lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM") -> Any:
    """Our :class:`LoraSettings` as a PEFT ``LoraConfig``."""
    # lazy: peft, imports torch
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, bias="none", task_type=task_type,
    )


def on_gpu() -> bool:
    """True when training will run on a CUDA device (``ALIGNLOOP_FORCE_CPU=1`` forces CPU)."""
    if os.environ.get("ALIGNLOOP_FORCE_CPU") == "1":
        return False
    # lazy: torch, seconds and hundreds of MB
    import torch

    return torch.cuda.is_available()


def compute_dtype() -> Any:
    """bf16 on GPU, float32 on CPU (ground.platform.training_dtype)."""
    # lazy: torch, seconds and hundreds of MB
    import torch

    return torch.bfloat16 if on_gpu() else torch.float32


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (all cores by default); returns the number used."""
    # lazy: torch, seconds and hundreds of MB
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def use_liger(setting: bool | None, gpu: bool) -> bool:
    """Whether to train with Liger's kernels: ``setting`` (None = when installed), on a GPU only
    (Triton kernels). ``true`` without the package is an error rather than a silent slow run."""
    if not gpu or setting is False:
        return False

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting and not installed:
        raise ValueError("train.liger_kernel: true, but the liger-kernel package is not installed")
    return installed


def trainer_kwargs(train: TrainSettings, output_dir: Path) -> dict[str, Any]:
    """The TrainingArguments fields the TRL configs share, chosen for this device."""
    gpu = on_gpu()
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "learning_rate": train.learning_rate,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "max_length": train.max_length,
        "warmup_steps": train.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        "lr_scheduler_type": train.lr_scheduler,
        "seed": train.seed,
        "logging_steps": train.logging_steps,
        "gradient_checkpointing": train.gradient_checkpointing,
        "use_liger_kernel": use_liger(train.liger_kernel, gpu),
        "bf16": gpu,  # TRL defaults to True; emulated bf16 on CPU is 10-20x slower
        "use_cpu": not gpu,
        "save_strategy": "no",  # the stage saves the adapter itself, once, at the end
        "report_to": [],
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
        "remove_unused_columns": True,
        # Under DDP every LoRA parameter gets a gradient each step: skip the search for unused
        # ones (an extra graph traversal per step).
        "ddp_find_unused_parameters": False,
    }


def load_split(dataset_path: str | Path, split: str, columns: list[str], min_rows: int) -> Any:
    """One split of the saved ``DatasetDict``, reduced to ``columns``; clear errors when unusable.

    Provenance columns (request_ids, feedback_ids, source) are dropped: TRL must see only the
    fields it trains on.
    """
    # lazy: datasets, pyarrow and pandas
    from datasets import load_from_disk

    path = Path(dataset_path)
    if not path.exists():
        raise FileNotFoundError(f"dataset_path: {path} does not exist (expected a DatasetDict saved with save_to_disk)")
    # In memory: later .map() calls must not write cache-*.arrow files into the input folder,
    # which would change its fingerprint and defeat stage skipping.
    dd = load_from_disk(str(path), keep_in_memory=True)
    if not hasattr(dd, "keys") or split not in dd:
        have = list(dd.keys()) if hasattr(dd, "keys") else "a single Dataset"
        raise ValueError(f"dataset_path: {path} has no split {split!r} (has {have})")
    ds = dd[split]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset_path: split {split!r} lacks columns {missing} (has {ds.column_names})")
    if len(ds) < min_rows:
        raise ValueError(
            f"dataset_path: split {split!r} has {len(ds)} rows; at least {min_rows} needed "
            f"(min_rows) to train on"
        )
    return ds.select_columns(columns)


def optional_split(dataset_path: str | Path, split: str | None, columns: list[str]) -> Any | None:
    """A held-out split if named, present and non-empty, else None."""
    if not split:
        return None
    # lazy: datasets, pyarrow and pandas
    from datasets import load_from_disk

    dd = load_from_disk(str(dataset_path), keep_in_memory=True)
    if split not in dd or len(dd[split]) == 0:
        return None
    return dd[split].select_columns(columns)


def resolve_run_dir(run_dir: str | None, input_path: str | Path | None = None) -> Path:
    """The run folder: ``run_dir`` if set; else the run that produced ``input_path``; else a new one.

    A stage output lives at ``<run>/<stage>/output/...``, so a later stage given an earlier
    stage's output joins the same run unless told otherwise.
    """
    if run_dir:
        return Path(run_dir).resolve()
    if input_path is not None:
        p = Path(input_path).resolve()
        for parent in p.parents:
            if parent.name == "output" and (parent.parent / "fingerprints.json").is_file():
                return parent.parent.parent
    return data_dir() / "runs" / new_run_id()


def loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """``[{"step": s, "loss": l}, ...]`` from a trainer's log history."""
    return [
        {"step": int(e["step"]), "loss": round(float(e["loss"]), 5)}
        for e in log_history if "loss" in e and "step" in e
    ]


def write_lineage(adapter_dir: Path, base_model: str, parents: list[str]) -> None:
    """Record which base and earlier adapters this adapter was trained on (read by the merge)."""
    (adapter_dir / ADAPTER_LINEAGE).write_text(
        json.dumps({"base_model": base_model, "parent_adapters": parents}, indent=2)
    )


def read_lineage(adapter_dir: str | Path) -> dict[str, Any]:
    """The base model and parent adapters of an adapter folder (see :func:`write_lineage`)."""
    adapter_dir = Path(adapter_dir)
    f = adapter_dir / ADAPTER_LINEAGE
    if f.is_file():
        return json.loads(f.read_text())
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"base_model": cfg["base_model_name_or_path"], "parent_adapters": []}


def check_adapter_dir(path: str | Path, field: str) -> Path:
    """An existing PEFT adapter folder, or a clear error naming ``field``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{field}: adapter folder not found: {p}")
    if not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{field}: {p} is not a PEFT adapter folder (no adapter_config.json)")
    return p.resolve()


def is_quantized(model_dir: str | Path) -> bool:
    """True if the model folder's config.json declares a (non-null) quantization_config."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return False
    return bool(json.loads(cfg_file.read_text()).get("quantization_config"))
