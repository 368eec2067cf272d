"""SFT stage: real optimizer steps on the tiny model; clear errors; skip on unchanged inputs.

Fixtures (``tiny_dataset``, ``sft_result``) and dataset helpers live in conftest.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ground.config import ConfigError, build_config
from training.sft import SFTStageConfig, run


@pytest.mark.integration
def test_sft_trains_and_saves_a_loadable_adapter(sft_result, tiny_model_dir: Path, lora_weights) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert sft_result.steps == 3 and not sft_result.skipped
    assert len(sft_result.loss_curve) == 3
    assert all(math.isfinite(p["loss"]) for p in sft_result.loss_curve)
    assert math.isfinite(sft_result.heldout_loss)
    assert sft_result.tokens > 0 and sft_result.tokens_per_s > 0
    # LoRA B starts at zero: any non-zero B means the optimizer changed the adapter.
    tensors = lora_weights(sft_result.adapter_dir)
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_result.adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with adapted.disable_adapter():
            base_logits = adapted(input_ids=ids).logits
        tuned_logits = adapted(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits)
    lineage = json.loads((Path(sft_result.adapter_dir) / "alignloop_adapter.json").read_text())
    assert lineage == {"base_model": str(tiny_model_dir.resolve()), "parent_adapters": []}
    stored = json.loads((Path(sft_result.stage_dir) / "result.json").read_text())
    assert stored["loss_curve"] == sft_result.loss_curve


@pytest.mark.integration
def test_sft_skips_unchanged_inputs_and_reruns_on_change(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_dataset, make_sft_config
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = make_dataset(tmp_path / "ds", n=8)
    cfg = make_sft_config(tiny_model_dir, ds, tmp_path / "run", train={"max_steps": 1, "max_length": 64})
    first = run(cfg)
    result_file = Path(first.stage_dir) / "result.json"
    stamp = result_file.stat().st_mtime_ns
    again = run(cfg)
    assert again.skipped and result_file.stat().st_mtime_ns == stamp
    make_dataset(tmp_path / "ds", n=9)  # one more row: new fingerprint
    changed = run(cfg)
    assert not changed.skipped and changed.train_rows == 9


@pytest.mark.slow  # the tiny model needs the embedded model's tokenizer
def test_sft_refuses_too_small_dataset(tiny_model_dir: Path, tmp_path: Path, make_dataset, make_sft_config) -> None:
    ds = make_dataset(tmp_path / "ds", n=2)
    with pytest.raises(ValueError, match=r"dataset_path: split 'sft' has 2 rows; at least 4"):
        run(make_sft_config(tiny_model_dir, ds, tmp_path / "run"))


@pytest.mark.slow  # the tiny model needs the embedded model's tokenizer
def test_sft_clear_errors_for_missing_inputs(tiny_model_dir: Path, tmp_path: Path, make_dataset, make_sft_config) -> None:
    ds = make_dataset(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="dataset_path"):
        run(make_sft_config(tiny_model_dir, tmp_path / "nope", tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="not found"):
        run(make_sft_config(tmp_path / "no-model", ds, tmp_path / "run"))
    with pytest.raises(ValueError, match="no split 'train'"):
        run(make_sft_config(tiny_model_dir, ds, tmp_path / "run", split="train"))


def test_sft_config_names_bad_fields() -> None:
    with pytest.raises(ConfigError, match=r"lora.rank") as err:
        build_config(SFTStageConfig, {"dataset_path": "x", "lora": {"rank": 0}, "extra": 1})
    assert "extra: unknown key" in str(err.value)


def test_shipped_training_yamls_load() -> None:
    from ground.config import load_config, repo_root
    from training.dpo import DPOStageConfig
    from training.merge import MergeConfig
    from training.quantize import QuantizeConfig

    configs = repo_root() / "configs"
    for name, cls, required in [
        ("sft.yaml", SFTStageConfig, ["dataset_path=x"]),
        ("dpo.yaml", DPOStageConfig, ["dataset_path=x", "sft_adapter=y"]),
        ("merge.yaml", MergeConfig, ["adapter=y"]),
        ("quantize.yaml", QuantizeConfig, ["model_dir=m", "dataset_path=x"]),
    ]:
        text = (configs / name).read_text()
        assert text.startswith("# ") and "alignloop " in text.splitlines()[0]
        load_config(cls, configs / name, required)
