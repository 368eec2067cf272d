"""Which GPUs each vLLM release and each training stage runs on, and how much of their memory.

The decisions are pure functions of an inventory (the GPUs this process may use) and the holdings
(the placements of the releases that are warm now), so tests run them on made-up inventories;
:func:`gpu_inventory` reads the real one from ``nvidia-smi``. Rules (:class:`PlacementConfig`):

- A release needs ``tensor_parallel_size x data_parallel_size`` GPUs.
- **Whole GPUs** when there are enough for every release expected at once (``max_releases``: live,
  previous during its grace period, the candidates being evaluated) to have GPUs of its own: the
  release gets GPUs nobody holds, at ``whole_gpu_share`` of their memory.
- **A memory share** otherwise: releases are spread over the GPUs with the most free memory, each
  taking ``(1 - training_reserve - headroom) / releases per GPU`` of each of its GPUs (vLLM's
  ``gpu_memory_utilization``), so ``max_releases`` of them fit and ``training_reserve`` stays free
  for training. A release whose ``gpu_memory_utilization`` is set gets exactly that.
- **Training** takes the GPUs no release holds. When every GPU holds a release it may stop idle
  candidates (staged, not serving users) that free whole GPUs, else it takes what the releases
  leave on the GPUs with the most free memory, capped at that fraction (training/launch.py sets
  torch's per-process memory fraction).
- **CPU only**: no devices, nothing changes.

Each placement is recorded in the release's ``release.json`` (``placement``), so ``alignloop
release list`` and the loop see who holds what.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field, model_validator

from ground.config import StrictModel
from ground.platform import query_gpus
from serving.engine.vllm_server import VLLMArgs


class PlacementError(RuntimeError):
    """No devices can be given; the message says what is held and what would help."""


class PlacementConfig(StrictModel):
    """How releases and training share this machine's GPUs (ignored on a machine without GPUs)."""

    gpus: list[int] | None = Field(
        None, description="Physical GPU indexes alignloop may use; None = every visible GPU "
        "(CUDA_VISIBLE_DEVICES is honoured).",
    )
    max_releases: int = Field(
        4, ge=1, description="Releases expected warm at once (live, previous in its grace period, "
        "candidates under evaluation): GPUs are divided so that this many fit.",
    )
    whole_gpu_share: float = Field(
        0.9, gt=0, le=1, description="gpu_memory_utilization of a release that has its GPUs to itself."
    )
    training_reserve: float = Field(
        0.2, ge=0, lt=1, description="Share of each GPU that shared releases leave free for training."
    )
    headroom: float = Field(
        0.05, ge=0, lt=0.5, description="Share of each GPU nobody is given (CUDA context, fragmentation)."
    )
    min_training_share: float = Field(
        0.1, gt=0, le=1, description="Least GPU memory share a training stage may run in."
    )
    stop_idle_for_training: bool = Field(
        True, description="Stop staged (idle) candidates when that frees whole GPUs for training."
    )

    @model_validator(mode="after")
    def _fits(self) -> PlacementConfig:
        if self.training_reserve + self.headroom >= 1:
            raise ValueError("training_reserve + headroom must leave room for releases (< 1)")
        return self


@dataclass(frozen=True)
class Gpu:
    """One GPU: its physical index (what CUDA_VISIBLE_DEVICES names), name and memory."""

    index: int
    name: str = ""
    memory_mib: int = 0


@dataclass(frozen=True)
class Placement:
    """Devices given to one release or training stage.

    ``share`` is the fraction of each device's memory it may take (vLLM's gpu_memory_utilization;
    torch's per-process memory fraction for training); None = no cap (CPU, or training alone on
    its GPUs).
    """

    devices: tuple[int, ...] = ()
    share: float | None = None
    exclusive: bool = False
    reason: str = ""
    stop: tuple[str, ...] = field(default=())  # training only: idle releases to stop first

    @property
    def on_cpu(self) -> bool:
        return not self.devices

    def env(self) -> dict[str, str]:
        """What a child process needs to see exactly these GPUs (none on CPU)."""
        if self.on_cpu:
            return {}
        # nvidia-smi numbers GPUs by PCI bus; CUDA's default order may differ.
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in self.devices)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        d.pop("stop")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Placement:
        if not d:
            return cls()
        return cls(devices=tuple(d.get("devices", ())), share=d.get("share"),
                   exclusive=bool(d.get("exclusive")), reason=d.get("reason", ""))


def gpu_inventory(cfg: PlacementConfig | None = None) -> tuple[Gpu, ...]:
    """The GPUs this process may place work on (``ALIGNLOOP_FORCE_CPU=1``: none)."""
    out = query_gpus("index,uuid,name,memory.total", timeout_s=30, units=False)
    return parse_inventory(out, os.environ.get("CUDA_VISIBLE_DEVICES"), cfg.gpus if cfg else None)


def parse_inventory(smi_csv: str, visible: str | None, allowed: Sequence[int] | None) -> tuple[Gpu, ...]:
    """GPUs from ``nvidia-smi --query-gpu=index,uuid,name,memory.total`` output, restricted to
    ``CUDA_VISIBLE_DEVICES`` (indexes or UUIDs) and to ``allowed`` physical indexes."""
    rows = [[c.strip() for c in line.split(",")] for line in smi_csv.splitlines() if line.strip()]
    wanted = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    gpus = []
    for index, uuid, name, mem in rows:
        if wanted is not None and index not in wanted and uuid not in wanted:
            continue
        if allowed is not None and int(index) not in allowed:
            continue
        gpus.append(Gpu(int(index), name, int(float(mem))))
    return tuple(gpus)


# -- decisions -------------------------------------------------------------------------------------
def _used(gpu: int, held: Mapping[str, Placement]) -> float:
    """Share of ``gpu`` given out; a GPU held whole counts as full."""
    used = 0.0
    for p in held.values():
        if gpu in p.devices:
            used += 1.0 if p.exclusive else (p.share or 0.0)
    return used


def _describe(gpus: Sequence[Gpu], held: Mapping[str, Placement]) -> str:
    parts = []
    for g in gpus:
        holders = [rid for rid, p in held.items() if g.index in p.devices]
        parts.append(f"GPU {g.index}: {_used(g.index, held):.2f} given"
                     + (f" ({', '.join(holders)})" if holders else ""))
    return "; ".join(parts) or "no GPUs"


def place_release(
    args: VLLMArgs, gpus: Sequence[Gpu], held: Mapping[str, Placement], cfg: PlacementConfig
) -> Placement:
    """Devices and memory share for one release, given what the warm releases hold."""
    if not gpus:
        return Placement(reason="CPU: no GPUs on this machine")
    need = args.tensor_parallel_size * args.data_parallel_size
    if need > len(gpus):
        raise PlacementError(
            f"the release needs {need} GPUs (tensor_parallel_size {args.tensor_parallel_size} x "
            f"data_parallel_size {args.data_parallel_size}); {len(gpus)} usable here "
            f"({', '.join(str(g.index) for g in gpus)})"
        )
    idle = [g.index for g in gpus if _used(g.index, held) == 0]
    whole_mode = len(gpus) >= cfg.max_releases * need
    if whole_mode and args.gpu_memory_utilization is None and len(idle) >= need:
        return Placement(tuple(idle[:need]), cfg.whole_gpu_share, exclusive=True,
                         reason=f"whole GPUs: {len(gpus)} GPUs hold {cfg.max_releases} releases of {need}")
    per_gpu = math.ceil(cfg.max_releases * need / len(gpus))
    # Rounded down, so that max_releases shares never add up past what they divide.
    share = args.gpu_memory_utilization or math.floor(
        (1 - cfg.training_reserve - cfg.headroom) / per_gpu * 1000) / 1000
    free = {g.index: 1 - cfg.headroom - cfg.training_reserve - _used(g.index, held) for g in gpus}
    fits = sorted((i for i in free if free[i] + 1e-9 >= share), key=lambda i: (-free[i], i))
    if len(fits) < need:
        raise PlacementError(
            f"no room for a {share:.3f} memory share on {need} GPU(s) ({_describe(gpus, held)}; "
            f"each GPU keeps training_reserve {cfg.training_reserve} and headroom {cfg.headroom} "
            "free): retire a staged release, or change placement.max_releases, "
            "placement.training_reserve or the release's gpu_memory_utilization"
        )
    return Placement(tuple(sorted(fits[:need])), share,
                     reason=f"{share:.3f} of each GPU: {cfg.max_releases} releases over {len(gpus)} GPUs")


def place_training(
    gpus: Sequence[Gpu],
    held: Mapping[str, Placement],
    idle: Sequence[str],
    cfg: PlacementConfig,
    want: int | None = None,
) -> Placement:
    """Devices for a training stage: GPUs no release holds, else what the releases leave.

    Args:
        held: placements of the warm releases.
        idle: ids of warm releases nobody is served by (staged candidates); stopped first when
            that frees whole GPUs and ``cfg.stop_idle_for_training`` allows it (``Placement.stop``).
        want: GPUs (processes) wanted; None = every GPU that can be had whole, else one shared.
    """
    if not gpus:
        return Placement(reason="CPU: no GPUs on this machine")
    if want is not None and want > len(gpus):
        raise PlacementError(f"training wants {want} GPUs; {len(gpus)} usable here")
    whole = [g.index for g in gpus if _used(g.index, held) == 0]
    stop: list[str] = []
    if cfg.stop_idle_for_training and len(whole) < (want or 1):
        busy = {d for rid, p in held.items() if rid not in idle for d in p.devices}
        freed = [g.index for g in gpus if g.index not in whole and g.index not in busy]
        if freed:
            stop = sorted(rid for rid in idle if rid in held and set(held[rid].devices) & set(freed))
            whole = sorted(whole + freed)
    if whole and len(whole) >= (want or 1):
        chosen = tuple(whole[: want or len(whole)])
        why = f"GPUs no release holds: {list(chosen)}" + (f" (after stopping idle {stop})" if stop else "")
        return Placement(chosen, None, exclusive=True, reason=why, stop=tuple(stop))
    free = {g.index: 1 - cfg.headroom - _used(g.index, held) for g in gpus}
    order = sorted(free, key=lambda i: (-free[i], i))[: want or 1]
    share = round(min(free[i] for i in order), 3)
    if share < cfg.min_training_share:
        raise PlacementError(
            f"no GPU memory for training: the largest free share is {share:.2f} < "
            f"min_training_share {cfg.min_training_share} ({_describe(gpus, held)})"
        )
    return Placement(tuple(sorted(order)), share, reason=f"{share:.3f} of GPUs {sorted(order)} beside the releases")


def apply_placement(args: VLLMArgs, placement: Placement) -> VLLMArgs:
    """The release's vLLM arguments on its placement: its GPUs and its memory share."""
    if placement.on_cpu:
        return args
    update: dict[str, Any] = {"env": {**args.env, **placement.env()}}
    if args.gpu_memory_utilization is None:
        update["gpu_memory_utilization"] = placement.share
    return args.model_copy(update=update)
