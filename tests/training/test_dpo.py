"""DPO stage on the SFT output: real steps, reward metrics, lineage for the merge, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.dpo import run


@pytest.mark.integration
def test_dpo_trains_on_the_sft_model(dpo_result, sft_result, lora_weights) -> None:
    assert dpo_result.steps == 3 and not dpo_result.skipped
    assert all(math.isfinite(p["loss"]) for p in dpo_result.loss_curve)
    # Same run folder as the SFT stage (run_dir not given: joins the run of its input).
    assert Path(dpo_result.stage_dir).parent == Path(sft_result.stage_dir).parent
    b = [t for k, t in lora_weights(dpo_result.adapter_dir).items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
    for split in ("train", "heldout"):
        metrics = dpo_result.reward_metrics[split]
        assert 0.0 <= metrics["accuracies"] <= 1.0
        assert math.isfinite(metrics["margins"]) and math.isfinite(metrics["loss"])
    # The reference is the SFT model: before any step the policy equals it, so the first
    # logged DPO loss is log(2) (zero reward margin).
    assert dpo_result.loss_curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    lineage = json.loads((Path(dpo_result.adapter_dir) / "alignloop_adapter.json").read_text())
    assert lineage["parent_adapters"] == [sft_result.adapter_dir]
    assert lineage["base_model"] == sft_result.base_model


@pytest.mark.integration
def test_dpo_skips_when_inputs_unchanged(dpo_result, sft_result, tiny_dataset: Path, make_dpo_config) -> None:
    again = run(make_dpo_config(sft_result.adapter_dir, tiny_dataset))
    assert again.skipped and again.adapter_dir == dpo_result.adapter_dir


def test_dpo_clear_errors(tmp_path: Path, tiny_dataset: Path, make_dpo_config) -> None:
    with pytest.raises(FileNotFoundError, match="sft_adapter: adapter folder not found"):
        run(make_dpo_config(tmp_path / "missing", tiny_dataset))
    (tmp_path / "not-adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="sft_adapter: .* not a PEFT adapter"):
        run(make_dpo_config(tmp_path / "not-adapter", tiny_dataset))


@pytest.mark.integration
def test_dpo_refuses_too_few_pairs(sft_result, tmp_path: Path, make_dataset, make_dpo_config) -> None:
    small = make_dataset(tmp_path / "small", n=2)
    with pytest.raises(ValueError, match="split 'dpo' has 2 rows"):
        run(make_dpo_config(sft_result.adapter_dir, small, run_dir=str(tmp_path / "run")))
