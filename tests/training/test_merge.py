"""Merge stage: SFT + DPO adapters folded into a full model folder whose logits match base+adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ground.config import build_config
from training.merge import MergeConfig, run


def merge_config(adapter: str | Path, **extra) -> MergeConfig:
    return build_config(MergeConfig, {"adapter": str(adapter), **extra})


def _reference_logits(base: Path, sft_adapter: str, dpo_adapter: str, ids):
    """Base + adapters the way they were trained: SFT merged in memory, DPO adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, sft_adapter).merge_and_unload()
    model = PeftModel.from_pretrained(model, dpo_adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.integration
def test_merged_model_matches_base_plus_adapters(dpo_result, sft_result, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    result = run(merge_config(dpo_result.adapter_dir, dtype="float32", run_dir=str(tmp_path / "run")))
    assert result.adapters == [sft_result.adapter_dir, dpo_result.adapter_dir]
    assert result.max_logit_diff <= 1e-3
    model_dir = Path(result.model_dir)
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= files
    assert not (model_dir / "adapter_config.json").exists()
    ids = torch.tensor([[1, 9707, 28, 1551, 30, 2]])
    expected = _reference_logits(tiny_model_dir, sft_result.adapter_dir, dpo_result.adapter_dir, ids)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)  # adapters did something


@pytest.mark.integration
def test_merge_in_serving_dtype_and_skip(dpo_result, tmp_path: Path) -> None:
    from training.merge import resolve_dtype

    cfg = merge_config(dpo_result.adapter_dir, run_dir=str(tmp_path / "run"))
    result = run(cfg)
    assert result.dtype == resolve_dtype("auto")
    saved = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert saved["dtype"] == result.dtype
    if result.dtype != "float32":
        assert result.delta_rounding_error is not None and 0 <= result.delta_rounding_error <= 1
    assert run(cfg).skipped


def _untrained_adapter(base: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(dest)
    return dest


@pytest.mark.slow  # the tiny model needs the embedded model's tokenizer
def test_merge_refuses_quantized_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = _untrained_adapter(tiny_model_dir, tmp_path / "adapter")
    fake = tmp_path / "quantized-base"
    shutil.copytree(tiny_model_dir, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="base_model: .* is quantized"):
        run(merge_config(adapter, base_model=str(fake), run_dir=str(tmp_path / "run")))


def test_merge_refuses_missing_adapter(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter: adapter folder not found"):
        run(merge_config(tmp_path / "nope"))
