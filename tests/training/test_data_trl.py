"""The saved datasets pass through TRL's own SFT and DPO data preparation (one real step each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ground.logstore import ExchangeRecord, LogStore
from training.data import DataConfig, run


@pytest.mark.integration
def test_saved_dataset_trains_with_trl(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    db = LogStore(url)
    for i in range(3):
        db.log_exchange(
            ExchangeRecord(
                id=f"r{i}",
                tenant="t",
                release="r1",
                response=f"Maybe {i}, not sure.",
                messages=[{"role": "user", "content": f"How big is plan {i}?"}],
            )
        )
    db.flush()
    for i in range(3):
        db.add_feedback(f"r{i}", "t", "edit", {"text": f"Plan {i} has {i + 5} GB."},
                        actor="rev", actor_role="reviewer")  # reviewed edits: SFT targets
    db.close()
    evals = tmp_path / "e.jsonl"
    evals.write_text(json.dumps({"prompt": "unrelated eval item"}) + "\n")
    res = run(
        DataConfig.model_validate(
            {
                "run_dir": str(tmp_path / "run"),
                "logstore": {"url": url},
                "governance": {"eval_globs": [str(evals)], "heldout_fraction": 0},
                "trust": {"tenants": ["t"]},
                "ledger": {"path": str(tmp_path / "ledger"), "min_new_rows": 1},
            }
        )
    )

    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    ds = load_from_disk(res.dataset_path)
    common = {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "bf16": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
    }
    sft = SFTTrainer(
        model=str(tiny_model_dir),
        train_dataset=ds["sft"],
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=128, **common),
    )
    # TRL tokenized the conversational rows; the prompt is masked out of the loss (labels -100).
    labels = sft.train_dataset[0]["labels"]
    assert labels[0] == -100 and any(t != -100 for t in labels)
    assert sft.train().training_loss > 0
    dpo = DPOTrainer(
        model=str(tiny_model_dir),
        train_dataset=ds["dpo"],
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=128, **common),
    )
    assert dpo.train().training_loss > 0
