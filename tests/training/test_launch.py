"""SFT and DPO through `accelerate launch` (training/launch.py): one process on this CPU, real
optimizer steps on the tiny model, the run folder exactly as the in-process stage writes it.

Multi-GPU (DDP, FSDP) cannot run here; its command line is checked as data, and
benchmarks/gpu/train_scaling.py runs it on GPUs (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from ground.config import build_config
from training.launch import LaunchSettings, TrainingLaunchError, accelerate_command, run_stage

ACCEL = {"launcher": "accelerate"}


def test_accelerate_command_per_machine() -> None:
    target = ["-m", "training.sft", "--config", "c.yaml"]
    cpu = accelerate_command(LaunchSettings(), 1, gpu=False, target=target)
    assert cpu[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--cpu" in cpu and "--multi_gpu" not in cpu and cpu[-4:] == target
    assert cpu[cpu.index("--mixed_precision") + 1] == "no"
    ddp = accelerate_command(LaunchSettings(), 2, gpu=True, target=target)
    assert "--multi_gpu" in ddp and "--cpu" not in ddp and "--use_fsdp" not in ddp
    assert ddp[ddp.index("--num_processes") + 1] == "2" and ddp[ddp.index("--mixed_precision") + 1] == "bf16"
    assert int(ddp[ddp.index("--main_process_port") + 1]) > 0
    fsdp = accelerate_command(
        LaunchSettings(strategy="fsdp", fsdp={"layer_cls": "LlamaDecoderLayer", "cpu_offload": True}), 2, True, target
    )
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--fsdp_version") + 1] == "2"
    assert fsdp[fsdp.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "LlamaDecoderLayer"
    assert fsdp[fsdp.index("--fsdp_offload_params") + 1] == "true"


@pytest.mark.slow  # the tiny model needs the embedded model's tokenizer
def test_more_processes_than_gpus_is_refused(make_sft_config, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = make_sft_config(tiny_model_dir, tmp_path / "ds", tmp_path / "run", launch={"num_processes": 2})
    with pytest.raises(ValueError, match="launch.num_processes: 2 processes need as many GPUs"):
        run_stage("sft", cfg, devices=[0])


@pytest.mark.integration
def test_sft_then_dpo_through_accelerate_launch(
    tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path, make_sft_config, make_dpo_config, lora_weights,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALIGNLOOP_FORCE_CPU", "1")
    lines: list[str] = []
    run_dir = tmp_path / "run"
    sft = run_stage("sft", make_sft_config(tiny_model_dir, tiny_dataset, run_dir, launch=ACCEL), on_line=lines.append)
    assert sft.steps == 3 and sft.processes == 1 and not sft.skipped
    assert all(math.isfinite(p["loss"]) for p in sft.loss_curve)
    assert [ln for ln in lines if ln.startswith("sft step ")][-1].startswith("sft step 3/3 loss ")
    assert any(t.abs().sum() > 0 for k, t in lora_weights(sft.adapter_dir).items() if "lora_B" in k)
    # The run folder contract: the stage's own folder, result.json, lineage; plus the launch files.
    assert Path(sft.stage_dir) == run_dir / "sft"
    assert json.loads((run_dir / "sft" / "result.json").read_text())["loss_curve"] == sft.loss_curve
    assert (Path(sft.adapter_dir) / "alignloop_adapter.json").is_file()
    assert (run_dir / "launch" / "sft.yaml").is_file() and (run_dir / "launch" / "sft.log").stat().st_size > 0

    dpo_cfg = make_dpo_config(sft.adapter_dir, tiny_dataset, launch=ACCEL)
    dpo = run_stage("dpo", dpo_cfg, on_line=lines.append)
    assert dpo.steps == 3 and Path(dpo.stage_dir) == run_dir / "dpo"  # joined the SFT adapter's run
    assert dpo.reward_metrics["heldout"]["accuracies"] >= 0
    assert any(ln.startswith("dpo step 3/3") for ln in lines)

    again = run_stage("sft", make_sft_config(tiny_model_dir, tiny_dataset, run_dir, launch=ACCEL))
    assert again.skipped and again.loss_curve == sft.loss_curve  # same inputs: nothing retrained


@pytest.mark.integration
def test_a_failing_launched_stage_reports_its_own_error(
    tiny_model_dir: Path, tmp_path: Path, make_sft_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALIGNLOOP_FORCE_CPU", "1")
    cfg = build_config(type(make_sft_config(tiny_model_dir, tmp_path, tmp_path)), {
        "model": {"name_or_path": str(tiny_model_dir)}, "dataset_path": str(tmp_path / "missing"),
        "run_dir": str(tmp_path / "run"), "launch": ACCEL,
    })
    with pytest.raises(TrainingLaunchError, match=r"(?s)exited with 1.*dataset_path: .*missing does not exist"):
        run_stage("sft", cfg)
