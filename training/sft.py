"""SFT stage: a LoRA adapter trained with TRL's ``SFTTrainer`` on the ``sft`` split.

Rows are conversational prompt-completion pairs (``prompt``: messages ending with the user turn,
``completion``: one assistant message), so TRL computes the loss on the completion only, i.e. on
the assistant's tokens (SmolLM2's chat template has no ``{% generation %}`` markers, which
``assistant_only_loss`` would need). Output: ``<run>/sft/output/adapter`` (PEFT adapter, tokenizer,
``alignloop_adapter.json`` naming the base).

Run: ``alignloop sft --config configs/sft.yaml dataset_path=... [key=value ...]``; with GPUs it
runs under ``accelerate launch`` (``launch:``; training/launch.py), which starts
``python -m training.sft --config FILE`` in each process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from ground.config import ModelRef, StrictModel
from ground.runs import StageDir
from training.base_model import resolve_base_model
from training.launch import LaunchSettings, process_state, progress_callbacks, stage_main
from training.lora import (
    LoraSettings,
    TrainSettings,
    load_split,
    optional_split,
    resolve_run_dir,
    set_threads,
    to_lora_config,
    trainer_kwargs,
)
from training.stage import (
    StageResult,
    cached_or_start,
    load_model,
    load_tokenizer,
    result_fields,
    save_adapter,
)

log = logging.getLogger(__name__)

SFT_COLUMNS = ["prompt", "completion"]


class SFTStageConfig(StrictModel):
    """The SFT stage (``configs/sft.yaml``)."""

    model: ModelRef = Field(default_factory=ModelRef, description="Base model to adapt.")
    dataset_path: str = Field(..., description="DatasetDict folder (save_to_disk) with an 'sft' split.")
    split: str = Field("sft", description="Split to train on.")
    heldout_split: str | None = Field("heldout_sft", description="Split for the held-out loss; None = skip.")
    min_rows: int = Field(4, ge=1, description="Refuse to train on fewer rows than this.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation and batching.")
    packing: bool = Field(
        False, description="Pack rows into max_length blocks (BFD, padding-free; attention stays per row)."
    )
    run_dir: str | None = Field(None, description="Run folder; None = a new one under <data dir>/runs.")
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="How the training processes start.")


@dataclass(kw_only=True)
class SFTResult(StageResult):
    """What the SFT stage produced (also ``result.json``)."""

    train_rows: int
    heldout_rows: int
    heldout_loss: float | None
    tokens: int
    tokens_per_s: float
    processes: int = 1


def to_trl_config(cfg: SFTStageConfig, output_dir: Path) -> Any:
    """Our config as TRL's ``SFTConfig`` (the one place the mapping lives)."""
    # lazy: trl, imports torch and transformers
    from trl import SFTConfig

    return SFTConfig(
        **trainer_kwargs(cfg.train, output_dir),
        packing=cfg.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        dataset_num_proc=None,
    )


def run(cfg: SFTStageConfig) -> SFTResult:
    """Train the SFT LoRA adapter (skipped when the same inputs already produced one)."""
    t0 = time.monotonic()
    ranks = process_state()  # one process inline; every rank runs this under accelerate launch
    with ranks.main_process_first():  # the first use may materialize the embedded model
        base = resolve_base_model(cfg.model.name_or_path)
    train_ds = load_split(cfg.dataset_path, cfg.split, SFT_COLUMNS, cfg.min_rows)
    run_dir = resolve_run_dir(cfg.run_dir)
    stage = StageDir(run_dir, "sft", cfg, inputs={"dataset": cfg.dataset_path, "base": base})
    if (done := cached_or_start(stage, ranks)) is not None:
        return SFTResult(**{**done, "skipped": True})

    # lazy: trl, imports torch and transformers
    from trl import SFTTrainer

    threads = set_threads(cfg.train.threads)
    heldout = optional_split(cfg.dataset_path, cfg.heldout_split, SFT_COLUMNS)
    log.info("sft: %d rows (held-out %d), base %s, %d threads", len(train_ds),
             len(heldout) if heldout is not None else 0, base, threads)
    tok = load_tokenizer(base)
    trainer = SFTTrainer(
        model=load_model(base),
        args=to_trl_config(cfg, stage.path / "trainer"),
        train_dataset=train_ds,
        processing_class=tok,
        peft_config=to_lora_config(cfg.lora),
        callbacks=progress_callbacks(),
    )
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    t_train = time.monotonic()
    out = trainer.train()
    train_s = time.monotonic() - t_train
    epochs_done = float(trainer.state.epoch or 0.0)
    # TRL counts the non-padding tokens it trained on; fall back to dataset lengths x epochs.
    logged = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    tokens = int(logged[-1]) if logged else int(sum(lengths) * epochs_done)
    heldout_loss = None
    if heldout is not None:
        heldout_loss = round(float(trainer.evaluate(heldout)["eval_loss"]), 5)

    adapter_dir = save_adapter(trainer, stage, tok, base, [], ranks)
    result = SFTResult(
        **result_fields(trainer, stage, adapter_dir, base, ranks, started=t0, train_s=train_s,
                        threads=threads, fallback_loss=round(float(out.training_loss), 5)),
        train_rows=len(train_ds), heldout_rows=len(heldout) if heldout is not None else 0,
        heldout_loss=heldout_loss, tokens=tokens, tokens_per_s=round(tokens / max(train_s, 1e-9), 1),
        processes=ranks.num_processes,
    )
    if ranks.is_main_process:
        stage.save(asdict(result))
        log.info("sft: %d steps, loss %s, %.0f tok/s, %.1fs -> %s", result.steps, result.final_loss,
                 result.tokens_per_s, result.train_s, adapter_dir)
    return result


if __name__ == "__main__":  # one rank under `accelerate launch -m training.sft --config FILE`
    stage_main(SFTStageConfig, run)
