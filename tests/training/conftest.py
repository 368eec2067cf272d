"""Training-stage fixtures (SFT -> DPO chain on the tiny model) shared by tests/training/test_*.py.

A small hand-made dataset in the data stage's format (``DatasetDict`` with sft, dpo, heldout_sft,
heldout_dpo; provenance columns included), and the SFT and DPO stage results, trained once per
session (real optimizer steps on the 2-layer tiny Llama).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ground.config import build_config
from training.dpo import DPOStageConfig
from training.dpo import run as run_dpo
from training.sft import SFTStageConfig
from training.sft import run as run_sft

TOPICS = ["refund policy", "opening hours", "password reset", "shipping times", "data privacy"]


def make_rows(n: int, offset: int = 0) -> tuple[list[dict], list[dict]]:
    """SFT rows and DPO pairs in the data stage's format (provenance columns included)."""
    sft, dpo = [], []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = [{"role": "user", "content": f"Question {i}: what is your {topic}?"}]
        good = f"Our {topic} is on the help page; support can give details."
        bad = f"No idea about {topic}."
        prov = {"request_ids": [f"r{i}"], "feedback_ids": [f"f{i}"], "source": "test"}
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": good}], **prov})
        dpo.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}], **prov})
    return sft, dpo


def write_dataset(path: Path, n: int = 12, heldout: int = 4) -> Path:
    """A DatasetDict saved like training/data.py saves it: sft, dpo, heldout_sft, heldout_dpo."""
    from datasets import Dataset, DatasetDict

    sft, dpo = make_rows(n)
    hsft, hdpo = make_rows(heldout, offset=1000)
    DatasetDict(
        sft=Dataset.from_list(sft), dpo=Dataset.from_list(dpo),
        heldout_sft=Dataset.from_list(hsft), heldout_dpo=Dataset.from_list(hdpo),
    ).save_to_disk(str(path))
    return path


def sft_config(model: Path, dataset: Path, run_dir: Path, **extra) -> SFTStageConfig:
    return build_config(SFTStageConfig, {
        "model": {"name_or_path": str(model)}, "dataset_path": str(dataset), "run_dir": str(run_dir),
        "train": {"max_steps": 3, "batch_size": 4, "max_length": 128, "learning_rate": 1e-3},
        "lora": {"rank": 4, "alpha": 8}, **extra,
    })


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="session")
def sft_result(tiny_model_dir: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path_factory.mktemp("run")
    return run_sft(sft_config(tiny_model_dir, tiny_dataset, run_dir))


def lora_tensors(adapter_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def dpo_config(sft_adapter: str | Path, dataset: Path, **extra) -> DPOStageConfig:
    return build_config(DPOStageConfig, {
        "sft_adapter": str(sft_adapter), "dataset_path": str(dataset),
        "train": {"max_steps": 3, "batch_size": 4, "max_length": 128, "learning_rate": 1e-3},
        "lora": {"rank": 4, "alpha": 8}, **extra,
    })


@pytest.fixture(scope="session")
def dpo_result(sft_result, tiny_dataset: Path):
    return run_dpo(dpo_config(sft_result.adapter_dir, tiny_dataset))


# Factory fixtures: the helpers above, for test modules (importlib mode cannot import conftest).
@pytest.fixture
def make_dataset():
    return write_dataset


@pytest.fixture
def make_sft_config():
    return sft_config


@pytest.fixture
def make_dpo_config():
    return dpo_config


@pytest.fixture
def lora_weights():
    return lora_tensors
