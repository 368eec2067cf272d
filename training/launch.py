"""SFT and DPO through ``accelerate launch``: DDP over the GPUs a stage is given, FSDP for models
that do not fit one GPU, one process on a CPU.

:func:`run_stage` is what the loop's task (and ``alignloop sft|dpo``) calls. It writes the stage's
resolved config into the run folder, starts

    python -m accelerate.commands.launch [flags] -m training.sft --config <run>/launch/sft.yaml

as a child process that dies with its caller (ground/procs.py), streams the child's output into
our log line by line (progress lines as ``step n/N loss ...``), and returns the result the rank-0
process printed: the stage's own ``run(cfg)`` does the work in every rank, and the run folder
(``<run>/<stage>/``: config, fingerprints, adapter, result.json) is exactly the in-process one.
``launcher: inline`` (the default without GPUs) runs the stage in this process instead.

The YAML carries the launch settings (``launch:`` in configs/sft.yaml and configs/dpo.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel, data_dir, dump_config, load_config, repo_root
from ground.procs import free_port, owned_popen, stop_group
from training.lora import resolve_run_dir

log = logging.getLogger(__name__)

PROGRESS = "ALIGNLOOP_PROGRESS "
RESULT = "ALIGNLOOP_RESULT "
MEMORY_FRACTION_ENV = "ALIGNLOOP_GPU_MEMORY_FRACTION"


class TrainingLaunchError(RuntimeError):
    """The launched stage failed; the message carries the tail of its output."""


class FSDPSettings(StrictModel):
    """Fully sharded data parallel (``strategy: fsdp``): for models that do not fit one GPU."""

    version: Literal[1, 2] = Field(2, description="FSDP version (2 = per-parameter sharding, torch's current one).")
    reshard_after_forward: bool = Field(
        True, description="Free the gathered weights after each layer's forward (FULL_SHARD); false = SHARD_GRAD_OP."
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters in CPU memory (slow; for the largest models).")
    activation_checkpointing: bool = Field(False, description="Recompute each layer's activations in backward.")
    layer_cls: str | None = Field(
        None, description="Decoder layer class to wrap (e.g. LlamaDecoderLayer); None = the model's own choice."
    )


class LaunchSettings(StrictModel):
    """How a training stage's processes start (``launch:`` in the stage's YAML)."""

    launcher: Literal["auto", "inline", "accelerate"] = Field(
        "auto", description="'accelerate' = `accelerate launch` child process(es); 'inline' = in this "
        "process; 'auto' = accelerate when GPUs are given, inline on a CPU machine.",
    )
    num_processes: int | None = Field(
        None, ge=1, description="Training processes; None = one per GPU the stage is given (1 on CPU).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: each GPU holds the model (LoRA on models that fit); fsdp: shard it."
    )
    fsdp: FSDPSettings = Field(default_factory=FSDPSettings, description="Used when strategy is fsdp.")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Rendezvous port; None = a free one.")
    extra_args: list[str] = Field(default_factory=list, description="More `accelerate launch` flags, verbatim.")


# -- in every rank --------------------------------------------------------------------------------
class _OneProcess:
    """The rank helpers of a run without a process group (inline, or a single launched process)."""

    is_main_process = True
    num_processes = 1

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        yield

    def wait_for_everyone(self) -> None:
        pass


def process_state() -> Any:
    """accelerate's ``PartialState`` when launched as several processes, else a one-process stand-in
    (so an inline run never initialises accelerate's state ahead of the trainer's own settings)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _OneProcess()
    # lazy: accelerate, imports torch
    from accelerate import PartialState

    return PartialState()


def progress_callbacks() -> list[Any]:
    """A callback that prints one ``ALIGNLOOP_PROGRESS {json}`` line per logging step (rank 0),
    when the launcher asked for it; none otherwise."""
    if os.environ.get("ALIGNLOOP_PROGRESS") != "1":
        return []
    # lazy: transformers, imports torch
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if state.is_world_process_zero and logs and "loss" in logs:
                keep = {k: logs[k] for k in ("loss", "learning_rate", "num_tokens") if k in logs}
                print(PROGRESS + json.dumps({"step": state.global_step, "max_steps": state.max_steps, **keep}),
                      flush=True)

    return [Progress()]


def stage_main(config_cls: type[StrictModel], run: Callable[[Any], Any], argv: Sequence[str] | None = None) -> None:
    """Entry of ``python -m training.<stage> --config FILE [key=value ...]`` in each rank."""
    ap = argparse.ArgumentParser(description=f"one rank of the {config_cls.__name__} stage")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fraction = os.environ.get(MEMORY_FRACTION_ENV)
    if fraction:
        # lazy: torch, seconds and hundreds of MB
        import torch

        if torch.cuda.is_available():  # a GPU shared with serving releases: stay in our share
            device = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_per_process_memory_fraction(float(fraction), device)
    result = run(load_config(config_cls, a.config, a.overrides))
    if process_state().is_main_process:
        print(RESULT + json.dumps(asdict(result), default=str), flush=True)


# -- in the caller --------------------------------------------------------------------------------
def accelerate_command(
    settings: LaunchSettings, num_processes: int, gpu: bool, target: Sequence[str], port: int | None = None
) -> list[str]:
    """The ``accelerate launch`` argv for ``target`` (``["-m", "module", ...]`` or a script)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(num_processes), "--num_machines", "1",
           "--mixed_precision", "bf16" if gpu else "no", "--dynamo_backend", "no"]
    if not gpu:
        cmd.append("--cpu")
    elif num_processes > 1 and settings.strategy == "ddp":
        cmd.append("--multi_gpu")
    if settings.strategy == "fsdp":
        f = settings.fsdp
        cmd += ["--use_fsdp", "--fsdp_version", str(f.version),
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_state_dict_type", "FULL_STATE_DICT",
                "--fsdp_reshard_after_forward", str(f.reshard_after_forward).lower(),
                "--fsdp_offload_params", str(f.cpu_offload).lower(),
                "--fsdp_activation_checkpointing", str(f.activation_checkpointing).lower(),
                "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_use_orig_params", "true"]
        if f.layer_cls:
            cmd += ["--fsdp_transformer_layer_cls_to_wrap", f.layer_cls]
    if num_processes > 1 or port:
        cmd += ["--main_process_port", str(port or free_port())]
    return cmd + list(settings.extra_args) + list(target)


def visible_gpus() -> list[int]:
    """GPUs this process may use when nobody placed the stage (CUDA_VISIBLE_DEVICES or all)."""
    if os.environ.get("ALIGNLOOP_FORCE_CPU") == "1":
        return []
    # lazy: torch, seconds and hundreds of MB
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(v) for v in visible.split(",") if v.strip().isdigit()][:n]
    return list(range(n))


_RESULTS = {"sft": "SFTResult", "dpo": "DPOResult"}


def _stage_module(stage: str) -> Any:
    if stage not in _RESULTS:
        raise ValueError(f"stage: {stage!r} cannot be launched (sft or dpo)")
    return importlib.import_module(f"training.{stage}")


def run_stage(
    stage: Literal["sft", "dpo"],
    cfg: Any,
    devices: Sequence[int] | None = None,
    memory_fraction: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Any:
    """Run the SFT or DPO stage as ``cfg.launch`` says and return its result dataclass.

    Args:
        devices: physical GPU indexes given to the stage (serving/releases/placement.py); None = the
            visible GPUs.
        memory_fraction: cap of each process's share of its GPU (a GPU shared with releases).
        on_line: called with each line of the child's output worth showing (a Prefect logger).
    """
    module = _stage_module(stage)
    gpus = list(devices) if devices is not None else visible_gpus()
    mode = cfg.launch.launcher
    if mode == "auto":
        mode = "accelerate" if gpus else "inline"
    if mode == "inline":
        return module.run(cfg)
    nproc = cfg.launch.num_processes or max(1, len(gpus))
    if gpus and nproc > len(gpus):
        raise ValueError(f"launch.num_processes: {nproc} processes need as many GPUs; {len(gpus)} given ({gpus})")
    anchor = getattr(cfg, "sft_adapter", None)  # DPO joins the SFT adapter's run
    run_dir = resolve_run_dir(cfg.run_dir, anchor)
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    config_file = run_dir / "launch" / f"{stage}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_config(cfg))
    cmd = accelerate_command(cfg.launch, nproc, bool(gpus), ["-m", f"training.{stage}", "--config", str(config_file)],
                             cfg.launch.main_process_port)
    env = {**os.environ, "ALIGNLOOP_PROGRESS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    if gpus:
        env.update({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus[:nproc]))})
    if memory_fraction:
        env[MEMORY_FRACTION_ENV] = str(memory_fraction)
    log_path = run_dir / "launch" / f"{stage}.log"
    log.info("%s: %d process(es) on %s: %s", stage, nproc, f"GPUs {gpus[:nproc]}" if gpus else "CPU", " ".join(cmd))
    result = _stream(cmd, env, log_path, stage, on_line or log.info)
    return getattr(module, _RESULTS[stage])(**result)


def _stream(cmd: list[str], env: dict[str, str], log_path: Path, stage: str, emit: Callable[[str], None]) -> dict:
    """Run ``cmd``, write its output to ``log_path``, pass lines on, return the printed result."""
    tail: deque[str] = deque(maxlen=40)
    result: dict | None = None
    t0 = time.monotonic()

    env = {**env, "ALIGNLOOP_HOME": str(data_dir())}  # the child runs from the checkout, not our cwd
    proc = owned_popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                       cwd=repo_root(), text=True, bufsize=1)
    try:
        with log_path.open("a") as logf:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                line = line.rstrip("\n")
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT):])
                    continue
                tail.append(line)
                if line.startswith(PROGRESS):
                    p = json.loads(line[len(PROGRESS):])
                    emit(f"{stage} step {p['step']}/{p['max_steps']} loss {p['loss']:.4f} "
                         f"({time.monotonic() - t0:.0f} s)")
                elif line.strip():
                    emit(f"{stage}: {line}")
        code = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    if code != 0 or result is None:
        raise TrainingLaunchError(
            f"{stage}: accelerate launch exited with {code}"
            + ("" if code else " without a result") + f"; log {log_path}:\n" + "\n".join(tail)
        )
    return result
