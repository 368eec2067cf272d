"""KTO stage: a fresh LoRA adapter trained with TRL's ``KTOTrainer`` on unpaired feedback.

Thumbs up or down on an answer that never pairs with another answer to the same prompt says
something DPO cannot use; KTO (Ethayarajh et al., 2024) learns from such (prompt, answer,
good/bad) rows directly. The stage trains on top of an earlier adapter, like DPO does on SFT:

- ``preference_objective: kto``     SFT -> KTO (on the ``kto`` split, plus the DPO pairs unpaired)
- ``preference_objective: dpo+kto`` SFT -> DPO -> KTO (on the ``kto`` split)

The base model and the earlier adapters (the given adapter and its lineage) are merged in memory;
KTO then trains a new LoRA on that model, and with a PEFT model and no ``ref_model`` TRL takes
the reference log-probabilities with the new adapter disabled. The adapter's
``alignloop_adapter.json`` lists every adapter under it, so the merge stage folds the whole chain.

TRL's KTO estimates its KL term from mismatched (prompt, answer) pairs within a batch, so batches
need at least 2 rows and a fixed order; rows are shuffled once with the seed so that each batch
mixes good and bad answers. ``desirable_weight: null`` balances the two kinds (TRL advises
desirable_weight x #good / (undesirable_weight x #bad) between 1 and 4/3; we make it 1).

Run: ``alignloop kto --config configs/kto.yaml adapter=<run>/dpo/output/adapter dataset_path=...``
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ground.config import StrictModel
from ground.runs import StageDir
from training.base_model import resolve_base_model
from training.launch import process_state
from training.lora import (
    LoraSettings,
    TrainSettings,
    check_adapter_dir,
    load_split,
    optional_split,
    preference_train_settings,
    read_lineage,
    resolve_run_dir,
    set_threads,
    to_lora_config,
    trainer_kwargs,
)
from training.stage import (
    PAIR_COLUMNS,
    StageResult,
    cached_or_start,
    load_merged,
    load_tokenizer,
    result_fields,
    save_adapter,
)

log = logging.getLogger(__name__)

KTO_COLUMNS = ["prompt", "completion", "label"]


class KTOStageConfig(StrictModel):
    """The KTO stage (``configs/kto.yaml``)."""

    adapter: str = Field(
        ..., description="Adapter to train on top of (SFT's, or DPO's); its lineage names the rest."
    )
    base_model: str | None = Field(
        None, description="Base model folder; None = the one recorded in the adapter's lineage."
    )
    dataset_path: str = Field(..., description="DatasetDict folder (save_to_disk) with a 'kto' split.")
    split: str = Field("kto", description="Split of unpaired rows (prompt, completion, label).")
    pairs_split: str | None = Field(
        None,
        description="Also learn from these preference pairs, unpaired (chosen good, rejected bad): "
        "'dpo' when KTO replaces DPO; None when DPO already trained on them.",
    )
    heldout_split: str | None = Field("heldout_kto", description="Held-out rows for reward metrics; None = skip.")
    min_rows: int = Field(4, ge=1, description="Refuse to train on fewer rows than this.")
    beta: float = Field(0.1, gt=0, description="KTO beta: higher keeps the policy closer to the reference.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="TRL KTO loss_type.")
    desirable_weight: float | None = Field(
        None, gt=0, description="Weight of good rows; None = balanced against the bad ones by count."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of bad rows.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The new KTO adapter.")
    train: TrainSettings = Field(
        default_factory=preference_train_settings, description="Optimisation and batching."
    )
    run_dir: str | None = Field(
        None, description="Run folder; None = the run that holds the adapter, else a new one."
    )

    @model_validator(mode="after")
    def _kl_needs_batches(self) -> KTOStageConfig:
        if self.loss_type == "kto" and self.train.batch_size < 2:
            raise ValueError(
                "train.batch_size: KTO estimates its KL term from the other rows of a batch; use >= 2"
            )
        return self


@dataclass(kw_only=True)
class KTOResult(StageResult):
    """What the KTO stage produced (also ``result.json``)."""

    parent_adapter: str
    train_rows: int
    desirable: int
    undesirable: int
    desirable_weight: float
    undesirable_weight: float
    heldout_rows: int
    reward_metrics: dict[str, dict[str, float]]


def balanced_weight(desirable: int, undesirable: int, undesirable_weight: float) -> float:
    """The desirable weight that makes both kinds weigh the same in total (1.0 if one is absent)."""
    if desirable == 0 or undesirable == 0:
        return 1.0
    return round(undesirable_weight * undesirable / desirable, 6)


def to_trl_config(cfg: KTOStageConfig, output_dir: Path, desirable_weight: float) -> Any:
    """Our config as TRL's ``KTOConfig`` (the one place the mapping lives)."""
    # lazy: trl, imports torch and transformers
    from trl import KTOConfig

    return KTOConfig(
        **trainer_kwargs(cfg.train, output_dir),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
    )


def load_rows(cfg: KTOStageConfig) -> Any:
    """The unpaired rows (plus the pairs, unpaired, when asked), shuffled once with the seed."""
    # lazy: datasets, pyarrow and pandas; trl, imports torch and transformers
    from datasets import concatenate_datasets
    from trl.data_utils import unpair_preference_dataset

    parts = [load_split(cfg.dataset_path, cfg.split, KTO_COLUMNS, 0)]
    if cfg.pairs_split:
        pairs = load_split(cfg.dataset_path, cfg.pairs_split, PAIR_COLUMNS, 0)
        if len(pairs):
            parts.append(unpair_preference_dataset(pairs).select_columns(KTO_COLUMNS).cast(parts[0].features))
    rows = concatenate_datasets(parts)
    if len(rows) < cfg.min_rows:
        raise ValueError(
            f"dataset_path: {len(rows)} unpaired rows in split {cfg.split!r}"
            + (f" + {cfg.pairs_split!r} unpaired" if cfg.pairs_split else "")
            + f"; at least {cfg.min_rows} needed (min_rows) to train on"
        )
    return rows.shuffle(seed=cfg.train.seed)


def _reward_summary(trainer: Any, ds: Any, name: str) -> dict[str, float]:
    """KTO's reward metrics (chosen/rejected rewards, margin, KL) on ``ds``, read from the log."""
    metrics = trainer.evaluate(ds, metric_key_prefix=f"eval_{name}")
    logged = trainer.state.log_history[-1]
    out = {"loss": round(float(metrics[f"eval_{name}_loss"]), 5)}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        value = logged.get(f"eval_{name}_{key}", logged.get(f"eval_{key}"))
        if value is not None and math.isfinite(float(value)):
            out[key.split("/")[-1]] = round(float(value), 5)
    return out


def run(cfg: KTOStageConfig) -> KTOResult:
    """Train the KTO adapter on top of ``cfg.adapter`` (skipped when the inputs are unchanged)."""
    t0 = time.monotonic()
    ranks = process_state()  # KTO runs inline, never under accelerate launch: one process
    parent = check_adapter_dir(cfg.adapter, "adapter")
    lineage = read_lineage(parent)
    base = resolve_base_model(cfg.base_model or lineage["base_model"])
    chain = [check_adapter_dir(p, "adapter (lineage)") for p in lineage.get("parent_adapters", [])] + [parent]
    rows = load_rows(cfg)
    run_dir = resolve_run_dir(cfg.run_dir, parent)
    stage = StageDir(run_dir, "kto", cfg, inputs={
        "dataset": cfg.dataset_path, "base": base, **{f"adapter_{i}": str(p) for i, p in enumerate(chain)},
    })
    if (done := cached_or_start(stage, ranks)) is not None:
        return KTOResult(**{**done, "skipped": True})

    # lazy: trl, imports torch and transformers
    from trl import KTOTrainer

    threads = set_threads(cfg.train.threads)
    desirable = sum(1 for label in rows["label"] if label)
    undesirable = len(rows) - desirable
    d_weight = cfg.desirable_weight or balanced_weight(desirable, undesirable, cfg.undesirable_weight)
    heldout = optional_split(cfg.dataset_path, cfg.heldout_split, KTO_COLUMNS)
    log.info("kto: %d rows (%d good, %d bad; weights %.3g/%.3g) on %s + %d adapters, %d threads",
             len(rows), desirable, undesirable, d_weight, cfg.undesirable_weight, base, len(chain), threads)
    tok = load_tokenizer(base)
    trainer = KTOTrainer(
        model=load_merged(base, chain),
        ref_model=None,  # PEFT: the reference is the same model with the KTO adapter disabled
        args=to_trl_config(cfg, stage.path / "trainer", d_weight),
        train_dataset=rows,
        processing_class=tok,
        peft_config=to_lora_config(cfg.lora),
    )
    t_train = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - t_train
    # KTO's KL estimate needs >= 2 rows in a batch: a held-out split of one row is not measured.
    reward_metrics = {}
    if heldout is not None and len(heldout) >= 2:
        reward_metrics["heldout"] = _reward_summary(trainer, heldout, "heldout")

    adapter_dir = save_adapter(trainer, stage, tok, base, [str(p) for p in chain], ranks)
    result = KTOResult(
        **result_fields(trainer, stage, adapter_dir, base, ranks, started=t0, train_s=train_s,
                        threads=threads),
        parent_adapter=str(parent), train_rows=len(rows), desirable=desirable,
        undesirable=undesirable, desirable_weight=d_weight,
        undesirable_weight=cfg.undesirable_weight,
        heldout_rows=len(heldout) if heldout is not None else 0, reward_metrics=reward_metrics,
    )
    if ranks.is_main_process:
        stage.save(asdict(result))
        log.info("kto: %d steps, loss %s, rewards %s, %.1fs -> %s", result.steps, result.final_loss,
                 reward_metrics, result.train_s, adapter_dir)
    return result
