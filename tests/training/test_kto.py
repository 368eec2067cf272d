"""KTO stage on unpaired thumbs up/down: real steps on the tiny model, on top of SFT or SFT + DPO,
and the merge folding the whole chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ground.config import ConfigError, build_config
from training.kto import KTOStageConfig, balanced_weight, run

TOPICS = ["refund policy", "opening hours", "password reset", "shipping times", "data privacy"]


def kto_rows(n: int, good_every: int = 2, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        good = i % good_every == 0
        text = f"Our {topic} is on the help page." if good else f"No idea about {topic}."
        rows.append({
            "prompt": [{"role": "user", "content": f"Question {i}: what is your {topic}?"}],
            "completion": [{"role": "assistant", "content": text}], "label": good,
            "request_ids": [f"r{i}"], "feedback_ids": [f"f{i}"], "source": "rating",
        })
    return rows


@pytest.fixture(scope="module")
def kto_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data stage's splits: kto (8 good, 8 bad), dpo pairs, held-out kto rows."""
    from datasets import Dataset, DatasetDict

    pairs = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": "See the help page."}],
              "rejected": r["completion"], "request_ids": r["request_ids"],
              "feedback_ids": r["feedback_ids"], "source": "edit"} for r in kto_rows(6, good_every=99, offset=50)]
    path = tmp_path_factory.mktemp("kto") / "ds"
    DatasetDict(
        kto=Dataset.from_list(kto_rows(16)), dpo=Dataset.from_list(pairs),
        heldout_kto=Dataset.from_list(kto_rows(4, offset=100)),
    ).save_to_disk(str(path))
    return path


def kto_config(adapter: str | Path, dataset: Path, run_dir: Path, **extra) -> KTOStageConfig:
    return build_config(KTOStageConfig, {
        "adapter": str(adapter), "dataset_path": str(dataset), "run_dir": str(run_dir),
        "train": {"max_steps": 3, "batch_size": 4, "max_length": 128, "learning_rate": 1e-3},
        "lora": {"rank": 4, "alpha": 8}, **extra,
    })


@pytest.mark.integration
def test_kto_trains_on_unpaired_rows_on_top_of_sft(sft_result, kto_dataset: Path, tmp_path: Path,
                                                   lora_weights) -> None:
    res = run(kto_config(sft_result.adapter_dir, kto_dataset, tmp_path / "run"))
    assert res.steps == 3 and not res.skipped
    assert (res.train_rows, res.desirable, res.undesirable) == (16, 8, 8)
    assert res.desirable_weight == 1.0  # balanced: as many good rows as bad
    assert all(math.isfinite(p["loss"]) for p in res.loss_curve)
    # Before the first update the policy equals its reference (adapter disabled, dropout off):
    # every row's loss is 1 - sigmoid(0) = 0.5.
    assert res.loss_curve[0]["loss"] == pytest.approx(0.5, abs=1e-3)
    b = [t for k, t in lora_weights(res.adapter_dir).items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
    assert math.isfinite(res.reward_metrics["heldout"]["loss"])
    lineage = json.loads((Path(res.adapter_dir) / "alignloop_adapter.json").read_text())
    assert lineage == {"base_model": sft_result.base_model, "parent_adapters": [sft_result.adapter_dir]}
    again = run(kto_config(sft_result.adapter_dir, kto_dataset, tmp_path / "run"))
    assert again.skipped and again.adapter_dir == res.adapter_dir


@pytest.mark.integration
def test_dpo_then_kto_then_merge_folds_the_chain(dpo_result, sft_result, kto_dataset: Path,
                                                 tmp_path: Path) -> None:
    from training.merge import MergeConfig
    from training.merge import run as merge

    res = run(kto_config(dpo_result.adapter_dir, kto_dataset, tmp_path / "run", pairs_split="dpo"))
    # KTO alone would learn the pairs too: 6 pairs -> 6 good + 6 bad rows on top of 16.
    assert (res.train_rows, res.desirable, res.undesirable) == (28, 14, 14)
    lineage = json.loads((Path(res.adapter_dir) / "alignloop_adapter.json").read_text())
    assert lineage["parent_adapters"] == [sft_result.adapter_dir, dpo_result.adapter_dir]
    merged = merge(build_config(MergeConfig, {"adapter": res.adapter_dir, "dtype": "float32"}))
    assert merged.adapters == [sft_result.adapter_dir, dpo_result.adapter_dir, res.adapter_dir]
    assert merged.max_logit_diff <= 1e-3


def test_kto_config_errors(tmp_path: Path, kto_dataset: Path) -> None:
    with pytest.raises(ConfigError, match="train.batch_size: KTO estimates its KL term"):
        kto_config("a", kto_dataset, tmp_path, train={"batch_size": 1})
    with pytest.raises(FileNotFoundError, match="adapter: adapter folder not found"):
        run(kto_config(tmp_path / "missing", kto_dataset, tmp_path / "run"))
    assert balanced_weight(10, 30, 1.0) == 3.0 and balanced_weight(5, 0, 1.0) == 1.0
