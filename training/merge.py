"""Merge stage: fold the LoRA adapters (SFT, then DPO) into the base and save a full model folder.

The adapter chain comes from ``alignloop_adapter.json`` in the last adapter's folder (the base and
the adapters it was trained on top of); give the DPO adapter to fold SFT + DPO, or the SFT adapter
alone. All adapters are attached unmerged and active at once (their deltas add, as merging them
one by one does), logits are taken, then ``merge_and_unload`` folds them and the logits are
compared: the check that the merge is what was trained.

Saved dtype: ``auto`` = the dtype this machine serves in (``serving_dtype``: bf16 on GPUs; float32
on CPUs unless the platform probe measured bf16 answering like float32 there). vLLM casts to its ``--dtype`` at load anyway, so a
float32 folder served in bf16 gives the same weights; what bf16 can lose is the part of a small
LoRA delta that falls below bf16's resolution of the base weight. ``delta_rounding_error`` records
it per weight (norm of the cast's error on the delta / norm of the delta). At the demo's sizes it
is above 1 (most single-weight deltas are below one bf16 step), yet the behaviour survives: the
rounding is unbiased and averages out; held-out DPO pairs kept ~95% of the chosen-answer log-prob
gain (+5.4 vs +5.7 nats) and of the margin gain in bf16 (benchmarks/training_cpu.py notes).

Run: ``alignloop merge --config configs/merge.yaml adapter=<run>/dpo/output/adapter``
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel
from ground.platform import detect, serving_dtype
from ground.runs import StageDir, folder_bytes
from training.base_model import resolve_base_model
from training.lora import check_adapter_dir, is_quantized, read_lineage, resolve_run_dir
from training.stage import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_CHECK_PROMPTS = [
    "What is the capital of France?",
    "Summarise our refund policy in one sentence.",
    "Write a haiku about the sea.",
]


class MergeConfig(StrictModel):
    """The merge stage (``configs/merge.yaml``)."""

    adapter: str = Field(..., description="Last adapter folder (DPO's, or SFT's alone); its lineage names the rest.")
    base_model: str | None = Field(None, description="Base model folder; None = the one in the adapter's lineage.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Saved dtype; 'auto' = what this machine serves well (serving_dtype)."
    )
    check_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CHECK_PROMPTS),
        description="Chat prompts whose logits must match between base+adapters and the merged model.",
    )
    tolerance: float = Field(
        1e-3, gt=0, description="Max |logit difference| allowed (float32, merged vs base+adapters)."
    )
    run_dir: str | None = Field(None, description="Run folder; None = the run that holds the adapter, else a new one.")


@dataclass
class MergeResult:
    """What the merge stage produced (also ``result.json``)."""

    stage_dir: str
    model_dir: str
    base_model: str
    adapters: list[str]
    dtype: str
    max_logit_diff: float
    max_logit_diff_saved_dtype: float
    delta_rounding_error: float | None
    model_bytes: int
    wall_s: float
    check: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def resolve_dtype(name: str) -> str:
    """'auto' -> serving_dtype of this machine."""
    if name != "auto":
        return name

    return serving_dtype(detect())


def _check_inputs(tok: Any, prompts: list[str]) -> Any:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def _logits(model: Any, batch: Any) -> Any:
    # lazy: torch, seconds and hundreds of MB
    import torch

    with torch.no_grad():
        out = model(**batch).logits.float()
    return out * batch["attention_mask"].unsqueeze(-1)  # padded positions compare as zero


def _delta_rounding_error(peft_model: Any, dtype: Any) -> float | None:
    """How much of the adapters' weight delta a cast to ``dtype`` loses (0 = none, 1 = all)."""
    # lazy: torch, seconds and hundreds of MB; peft, imports torch
    import torch
    from peft.tuners.lora import LoraLayer

    if dtype == torch.float32:
        return None
    lost2 = delta2 = 0.0
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            w0 = module.get_base_layer().weight.data.float()
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            kept = (w0 + delta).to(dtype).float() - w0.to(dtype).float()
            lost2 += float(((kept - delta) ** 2).sum())
            delta2 += float((delta**2).sum())
    return round(math.sqrt(lost2 / delta2), 4) if delta2 > 0 else 0.0


def check_mergeable(base: str) -> None:
    """Refuse a quantized base: adapters fold only into full-precision weights."""
    if is_quantized(base):
        raise ValueError(
            f"base_model: {base} is quantized (config.json has quantization_config); merge the adapters "
            "into the full-precision base, then quantize (merge-then-quantize is the only order)"
        )


def run(cfg: MergeConfig) -> MergeResult:
    """Fold the adapter chain into the base, check logits, save a full model folder."""
    # lazy: torch, seconds and hundreds of MB; peft, imports torch; transformers, imports torch
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    last = check_adapter_dir(cfg.adapter, "adapter")
    lineage = read_lineage(last)
    base = resolve_base_model(cfg.base_model or lineage["base_model"])
    check_mergeable(base)
    chain = [check_adapter_dir(p, "adapter (lineage)") for p in lineage.get("parent_adapters", [])] + [last]
    run_dir = resolve_run_dir(cfg.run_dir, last)
    inputs = {"base": base, **{f"adapter_{i}": str(p) for i, p in enumerate(chain)}}
    stage = StageDir(run_dir, "merge", cfg, inputs=inputs)
    if (done := stage.cached_result()) is not None:
        return MergeResult(**{**done, "skipped": True})
    stage.start()
    dtype_name = resolve_dtype(cfg.dtype)
    save_dtype = getattr(torch, dtype_name)
    log.info("merge: %s + %s -> %s", base, [str(p) for p in chain], dtype_name)

    # Compute in float32 so the check measures the merge, not rounding.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(chain))]
    model = PeftModel.from_pretrained(model, str(chain[0]), adapter_name=names[0])
    for name, path in zip(names[1:], chain[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(names)  # all active at once: W x + sum_i B_i A_i x
    model.eval()
    tok = load_tokenizer(base)
    batch = _check_inputs(tok, cfg.check_prompts)
    ref = _logits(model, batch)
    rounding = _delta_rounding_error(model, save_dtype)
    merged = model.merge_and_unload(adapter_names=names)
    got = _logits(merged, batch)
    diff = float((got - ref).abs().max())
    if not diff <= cfg.tolerance:
        raise RuntimeError(
            f"merge check failed: merged logits differ from base+adapters by {diff:.3g} "
            f"(> tolerance {cfg.tolerance:g}); the merged folder was not written"
        )
    # Round to the saved dtype, then compute in float32 again: what the cast alone changes.
    merged.to(save_dtype).float()
    diff_saved = float((_logits(merged, batch) - ref).abs().max())
    merged.to(save_dtype)

    model_dir = stage.out / "model"
    merged.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)  # tokenizer + chat template (chat_template.jinja)
    if (Path(base) / "generation_config.json").is_file():  # the base's own generation defaults
        shutil.copy2(Path(base) / "generation_config.json", model_dir / "generation_config.json")
    result = MergeResult(
        stage_dir=str(stage.path), model_dir=str(model_dir), base_model=base,
        adapters=[str(p) for p in chain], dtype=dtype_name, max_logit_diff=round(diff, 6),
        max_logit_diff_saved_dtype=round(diff_saved, 6), delta_rounding_error=rounding,
        model_bytes=folder_bytes(model_dir), wall_s=round(time.monotonic() - t0, 2),
        check={"prompts": len(cfg.check_prompts), "tolerance": cfg.tolerance},
    )
    stage.save(asdict(result))
    log.info("merge: max |logit diff| %.2e (fp32), %.2e (%s); -> %s (%.0f MB)", diff, diff_saved,
             dtype_name, model_dir, result.model_bytes / 1e6)
    return result
