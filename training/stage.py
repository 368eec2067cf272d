"""What the SFT, DPO and KTO stages do the same way around TRL's trainers.

Each stage module keeps what is its own: its config, its result's own fields, the mapping to its
TRL config (``to_trl_config``), its rows, its trainer and its metrics. The steps they share live
here: the tokenizer and the model (with earlier adapters merged in, for the stages that train on
top of one), the cached result or a fresh stage folder, the result folder (adapter, tokenizer,
lineage) and the result fields every stage records. The merge and quantize stages load their
tokenizer here too.

The functions that touch the stage folder take ``ranks`` (:func:`training.launch.process_state`):
under ``accelerate launch`` every rank calls them and only the main process writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ground.runs import StageDir, folder_bytes
from training.lora import compute_dtype, is_quantized, loss_curve, write_lineage

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]
"""A preference pair: DPO's rows; KTO unpairs them into good and bad rows."""


@dataclass(kw_only=True)
class StageResult:
    """The fields every training stage's result records (see :func:`result_fields`)."""

    stage_dir: str
    adapter_dir: str
    base_model: str
    steps: int
    epochs: float
    final_loss: float | None
    train_s: float
    wall_s: float
    adapter_bytes: int
    threads: int
    device: str
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    skipped: bool = False


def load_tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, with eos/pad agreeing with the model's config.json.

    The embedded model's GGUF-converted tokenizer names ``<|im_start|>`` as eos while its config
    (and chat template) end turns with ``<|im_end|>``; the config wins, so training, the merged
    folder and vLLM all stop on the token the template actually ends turns with.
    """
    # lazy: transformers pulls in torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg_file = Path(model_dir) / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    eos_id = cfg.get("eos_token_id")
    if isinstance(eos_id, int) and eos_id != tok.eos_token_id:
        log.warning("tokenizer eos %r differs from config eos id %d; using %r", tok.eos_token,
                    eos_id, tok.convert_ids_to_tokens(eos_id))
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token is None:
        pad_id = cfg.get("pad_token_id")
        tok.pad_token = (
            tok.convert_ids_to_tokens(pad_id) if isinstance(pad_id, int) else tok.eos_token
        )
    return tok


def load_model(model_dir: str) -> Any:
    """A causal LM in the training dtype (float32 on CPU, bf16 on GPU)."""
    # lazy: transformers pulls in torch
    from transformers import AutoModelForCausalLM

    if is_quantized(model_dir):
        raise ValueError(
            f"model: {model_dir} is a quantized checkpoint; train on the full-precision model "
            "(merge-then-quantize is the only order)"
        )
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype())


def load_merged(base: str, adapters: list[Path]) -> Any:
    """The base with each adapter merged in, in order: the model a stage trains on top of.

    With a PEFT model and no ``ref_model``, TRL takes the reference log-probabilities with the new
    adapter disabled, i.e. from this model: no second copy of the weights.
    """
    # lazy: peft pulls in torch
    from peft import PeftModel

    model = load_model(base)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def cached_or_start(stage: StageDir, ranks: Any) -> dict[str, Any] | None:
    """The stored result when the stage already ran on the same inputs; else None, once the main
    process has started the stage folder afresh and every rank has waited for it."""
    if (done := stage.cached_result()) is not None:
        return done
    if ranks.is_main_process:
        stage.start()
    ranks.wait_for_everyone()
    return None


def save_adapter(
    trainer: Any, stage: StageDir, tok: Any, base: str, parents: list[str], ranks: Any
) -> Path:
    """Write the result folder ``<stage>/output/adapter``: adapter, tokenizer and lineage.

    Every process calls it (FSDP gathers the full state dict collectively); only the main one
    writes. PEFT keeps the adapter's weights from the dict.

    Args:
        parents: the adapters merged under this one, in order (read back by the merge stage).
    """
    adapter_dir = stage.path / "output" / "adapter"
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if ranks.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        tok.save_pretrained(adapter_dir)
        write_lineage(adapter_dir, base, parents=parents)
    return adapter_dir


def result_fields(
    trainer: Any,
    stage: StageDir,
    adapter_dir: Path,
    base: str,
    ranks: Any,
    *,
    started: float,
    train_s: float,
    threads: int,
    fallback_loss: float | None = None,
) -> dict[str, Any]:
    """The :class:`StageResult` fields of a finished stage.

    Args:
        started: ``time.monotonic()`` when the stage began (for ``wall_s``).
        train_s: seconds spent in ``trainer.train()``.
        fallback_loss: the final loss when the trainer logged none.
    """
    curve = loss_curve(trainer.state.log_history)
    return {
        "stage_dir": str(stage.path), "adapter_dir": str(adapter_dir), "base_model": base,
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "final_loss": curve[-1]["loss"] if curve else fallback_loss,
        "train_s": round(train_s, 2), "wall_s": round(time.monotonic() - started, 2),
        "adapter_bytes": folder_bytes(adapter_dir) if ranks.is_main_process else 0,
        "threads": threads, "device": str(trainer.args.device), "loss_curve": curve,
    }
