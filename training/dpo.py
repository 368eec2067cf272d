"""DPO stage: a fresh LoRA adapter trained with TRL's ``DPOTrainer`` on top of the SFT model.

The base model and the SFT adapter are loaded and merged in memory (``merge_and_unload``); DPO
then trains a new LoRA on that SFT model. With a PEFT model and no ``ref_model``, TRL computes
the reference log-probabilities with the adapter disabled, i.e. from the SFT model itself: no
second copy of the weights.

How the merge stage finds both adapters: the DPO adapter folder carries
``alignloop_adapter.json`` with the base model and the SFT adapter path (``parent_adapters``), and
the DPO result records them too; the merge stage reads that file and folds SFT then DPO.

Run: ``alignloop dpo --config configs/dpo.yaml sft_adapter=<run>/sft/output/adapter [key=value ...]``;
with GPUs it runs under ``accelerate launch`` (``launch:``; training/launch.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel
from ground.runs import StageDir
from training.base_model import resolve_base_model
from training.launch import LaunchSettings, process_state, progress_callbacks, stage_main
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

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "sppo_hard"]


class DPOStageConfig(StrictModel):
    """The DPO stage (``configs/dpo.yaml``)."""

    sft_adapter: str = Field(..., description="The SFT stage's adapter folder (<run>/sft/output/adapter).")
    base_model: str | None = Field(
        None, description="Base model folder; None = the one recorded in the SFT adapter's lineage."
    )
    dataset_path: str = Field(..., description="DatasetDict folder (save_to_disk) with a 'dpo' split.")
    split: str = Field("dpo", description="Split of preference pairs to train on.")
    heldout_split: str | None = Field("heldout_dpo", description="Held-out pairs for reward metrics; None = skip.")
    min_rows: int = Field(4, ge=1, description="Refuse to train on fewer pairs than this.")
    beta: float = Field(0.1, gt=0, description="DPO beta: higher keeps the policy closer to the SFT reference.")
    loss_type: LossType = Field("sigmoid", description="DPO loss (TRL loss_type); 'sigmoid' is the original DPO.")
    eval_train: bool = Field(
        True,
        description="After training, measure reward accuracy/margins on the train pairs (two more forward "
        "passes per pair; the running means logged during training are recorded either way).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The new DPO adapter.")
    train: TrainSettings = Field(
        default_factory=preference_train_settings, description="Optimisation and batching."
    )
    run_dir: str | None = Field(
        None, description="Run folder; None = the run that holds sft_adapter, else a new one."
    )
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="How the training processes start.")


@dataclass(kw_only=True)
class DPOResult(StageResult):
    """What the DPO stage produced (also ``result.json``)."""

    sft_adapter: str
    train_pairs: int
    heldout_pairs: int
    reward_metrics: dict[str, dict[str, float]]
    tokens: int
    tokens_per_s: float
    processes: int = 1


def to_trl_config(cfg: DPOStageConfig, output_dir: Path) -> Any:
    """Our config as TRL's ``DPOConfig`` (the one place the mapping lives)."""
    # lazy: trl, imports torch and transformers
    from trl import DPOConfig

    return DPOConfig(
        **trainer_kwargs(cfg.train, output_dir),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
    )


def _reward_summary(logged: dict[str, float]) -> dict[str, float]:
    """Reward accuracy/margins from the log entry TRL writes after an ``evaluate`` call."""
    out = {}
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if f"eval_{key}" in logged:
            out[key.split("/")[-1]] = round(float(logged[f"eval_{key}"]), 5)
    return out


def evaluate_rewards(trainer: Any, datasets: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Reward accuracy and margins of the trained policy vs the reference on each dataset.

    TRL adds its reward metrics to the logged record, not to ``evaluate``'s return value, so
    they are read back from the log history.
    """
    out: dict[str, dict[str, float]] = {}
    for name, ds in datasets.items():
        metrics = trainer.evaluate(ds, metric_key_prefix=f"eval_{name}")
        summary = _reward_summary(trainer.state.log_history[-1])
        summary["loss"] = round(float(metrics[f"eval_{name}_loss"]), 5)
        out[name] = summary
    return out


def run(cfg: DPOStageConfig) -> DPOResult:
    """Train the DPO adapter on the SFT model (skipped when the inputs are unchanged)."""
    t0 = time.monotonic()
    ranks = process_state()  # one process inline; every rank runs this under accelerate launch
    sft_adapter = check_adapter_dir(cfg.sft_adapter, "sft_adapter")
    lineage = read_lineage(sft_adapter)
    with ranks.main_process_first():
        base = resolve_base_model(cfg.base_model or lineage["base_model"])
    train_ds = load_split(cfg.dataset_path, cfg.split, PAIR_COLUMNS, cfg.min_rows)
    run_dir = resolve_run_dir(cfg.run_dir, sft_adapter)
    stage = StageDir(
        run_dir, "dpo", cfg,
        inputs={"dataset": cfg.dataset_path, "base": base, "sft_adapter": str(sft_adapter)},
    )
    if (done := cached_or_start(stage, ranks)) is not None:
        return DPOResult(**{**done, "skipped": True})

    # lazy: trl, imports torch and transformers
    from trl import DPOTrainer

    threads = set_threads(cfg.train.threads)
    heldout = optional_split(cfg.dataset_path, cfg.heldout_split, PAIR_COLUMNS)
    log.info("dpo: %d pairs (held-out %d) on %s + %s, %d threads", len(train_ds),
             len(heldout) if heldout is not None else 0, base, sft_adapter, threads)
    tok = load_tokenizer(base)
    trainer = DPOTrainer(
        model=load_merged(base, [sft_adapter]),
        ref_model=None,  # PEFT: the reference is the SFT model with the DPO adapter disabled
        args=to_trl_config(cfg, stage.path / "trainer"),
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=to_lora_config(cfg.lora),
        callbacks=progress_callbacks(),
    )
    prepared = trainer.train_dataset
    # Each pair costs a forward+backward of prompt+chosen and prompt+rejected.
    pair_tokens = [
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True)
    ] if "prompt_ids" in prepared.column_names else []
    t_train = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - t_train
    epochs_done = float(trainer.state.epoch or 0.0)
    tokens = int(sum(pair_tokens) * epochs_done)

    eval_sets = {}
    if cfg.eval_train:
        eval_sets["train"] = train_ds
    if heldout is not None:
        eval_sets["heldout"] = heldout
    reward_metrics = evaluate_rewards(trainer, eval_sets)
    # Running means over the train pairs, logged while the policy was still changing: free,
    # and the only train-side numbers when eval_train is off.
    during = [e for e in trainer.state.log_history if "rewards/accuracies" in e and "loss" in e]
    if during:
        reward_metrics["train_during_training"] = {
            "accuracies": round(sum(e["rewards/accuracies"] for e in during) / len(during), 5),
            "margins": round(sum(e["rewards/margins"] for e in during) / len(during), 5),
        }

    parents = [*lineage.get("parent_adapters", []), str(sft_adapter)]
    adapter_dir = save_adapter(trainer, stage, tok, base, parents, ranks)
    result = DPOResult(
        **result_fields(trainer, stage, adapter_dir, base, ranks, started=t0, train_s=train_s,
                        threads=threads),
        sft_adapter=str(sft_adapter), train_pairs=len(train_ds),
        heldout_pairs=len(heldout) if heldout is not None else 0, reward_metrics=reward_metrics,
        tokens=tokens, tokens_per_s=round(tokens / max(train_s, 1e-9), 1),
        processes=ranks.num_processes,
    )
    if ranks.is_main_process:
        stage.save(asdict(result))
        log.info("dpo: %d steps, loss %s, rewards %s, %.1fs -> %s", result.steps, result.final_loss,
                 reward_metrics, result.train_s, adapter_dir)
    return result


if __name__ == "__main__":  # one rank under `accelerate launch -m training.dpo --config FILE`
    stage_main(DPOStageConfig, run)
