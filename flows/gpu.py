"""The loop on GPUs: where training runs, which vLLM kernels a candidate is tried with, and what
a release actually serves. No Prefect here: flows/loop.py's tasks call these.

- Training goes through ``accelerate launch`` (training/launch.py) on the GPUs that no serving
  release holds, or beside them in the memory they leave (serving/releases/placement.py); the holdings are
  read from the running gateway, which places every release it starts.
- A W4A16 candidate on a GPU is staged once per kernel worth comparing (vLLM's default Machete
  and Marlin): the serving choice then picks scheme *and* kernel from measurements, and the
  promoted release is the one already running with that kernel.
- The live release is labelled with what it really serves (its checkpoint's scheme, its kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from evals.serving_choice import KERNEL_ENV, scheme_of_model
from flows.loop_config import LoopConfig, admin_client
from serving.engine.vllm_server import VLLMArgs
from serving.releases.placement import Placement, PlacementError, gpu_inventory, place_training
from training.launch import run_stage

KERNEL_VARIANT_SUFFIX = {"default": "", "marlin": "-marlin"}


def training_placement(cfg: LoopConfig, processes: int | None = None) -> Placement:
    """GPUs for a training stage beside the running gateway's releases (none on a CPU machine).

    Idle staged candidates are retired first when that frees whole GPUs (placement config).
    """
    gpus = gpu_inventory(cfg.placement)
    if not gpus:
        return Placement(reason="CPU: no GPUs on this machine")
    with admin_client(cfg) as admin:
        described = admin.describe()
        warm = [r for r in described if r.get("warm")]
        held = {r["release_id"]: Placement.from_dict(r.get("placement")) for r in warm}
        idle = [r["release_id"] for r in warm if r["status"] == "staged"]
        placement = place_training(gpus, held, idle, cfg.placement, want=processes)
        for rid in placement.stop:
            admin.retire(rid, reason="stopped: its GPU is needed for training")
    return placement


def launch_training(
    cfg: LoopConfig, stage: str, on_line: Callable[[str], None] | None = None, **wired: Any
) -> dict[str, Any]:
    """Run SFT or DPO as the stage's ``launch`` settings say, on the GPUs placement gives it."""
    stage_cfg = cfg.stage_config(stage, **wired)
    placement = Placement()
    if stage_cfg.launch.launcher != "inline":
        try:
            placement = training_placement(cfg, stage_cfg.launch.num_processes)
        except PlacementError as exc:
            raise RuntimeError(f"{stage}: {exc}") from None
    if on_line and not placement.on_cpu:
        on_line(f"{stage}: {placement.reason}")
    result = run_stage(stage, stage_cfg, devices=list(placement.devices), memory_fraction=placement.share,
                       on_line=on_line)
    return asdict(result)


def kernels_for(cfg: LoopConfig, scheme: str, live: dict[str, Any]) -> list[str]:
    """vLLM kernels to stage a candidate of ``scheme`` with: ``cfg.kernels`` for W4A16 where the
    gateway serves on GPUs (the live release's placement says so), else the default one. Marlin
    beats vLLM's default Machete at low concurrency and loses at high, so both are measured."""
    if scheme != "w4a16" or not (live.get("placement") or {}).get("devices"):
        return ["default"]
    return list(dict.fromkeys(cfg.kernels))


def kernel_args(args: VLLMArgs, kernel: str) -> VLLMArgs:
    """The candidate's vLLM arguments with the kernel's environment."""
    return args.model_copy(update={"env": {**args.env, **KERNEL_ENV[kernel]}})


def served_label(release: dict[str, Any]) -> tuple[str, str]:
    """(scheme, kernel) a release really serves: its checkpoint's quantization, its vLLM env."""
    env = (release.get("vllm_args") or {}).get("env") or {}
    kernel = next((k for k, e in KERNEL_ENV.items() if e and all(env.get(n) == v for n, v in e.items())), "default")
    return scheme_of_model(release["model_dir"]), kernel
