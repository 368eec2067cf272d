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
(``serving.engine._probe_vllm``); the rules (which dtype and scheme win) and the cache are plain
functions in :mod:`ground.platform`, which both halves and the platform's readers use.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from ground.config import data_dir, repo_root
from ground.platform import (
    PROMPTS,
    SCHEME_ORDER,
    Platform,
    ProbeResult,
    Scheme,
    cache_file,
    cached,
    default_quant_scheme,
    detect,
    pick_dtype,
    pick_scheme,
    servable_schemes,
    serve_python,
    serving_vllm_version,
)
from serving.engine.vllm_server import CPU_ENGINE_ENV
from training.base_model import materialize
from training.quantize import Target, choose_scheme, quantize_round_to_nearest, target_platform

log = logging.getLogger(__name__)


def run_probe(
    p: Platform | None = None, model_dir: str | Path | None = None, force: bool = False,
    timeout_s: float = 1200,
) -> ProbeResult:
    """Measure (or read the cached measurement) on this CPU; see the module docstring.

    Raises RuntimeError on a GPU machine (its choices are not probed) and when the serving env
    cannot run the probe at all.
    """

    p = p or detect()
    if p.has_gpu:
        raise RuntimeError("the platform probe measures CPUs; GPU machines keep bf16 and W4A16/FP8")
    if not force and (hit := cached(p)) is not None:
        return hit
    t0 = time.monotonic()
    if model_dir is None:
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
                log.info("probe: round-to-nearest %s copy of %s", scheme, model_dir.name)
                quantize_round_to_nearest(model_dir, scheme, copy)
            variants.append({"name": scheme, "model": str(copy), "dtype": "probe"})
    spec = {"variants": variants, "prompts": list(PROMPTS), "check_tokens": 12, "tokens": 32, "batch": 8,
            "repeats": 2}
    python = str(serve_python())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(CPU_ENGINE_ENV)  # measured as the releases will serve
    env["ALIGNLOOP_HOME"] = str(data_dir())  # the child runs from the checkout, not our cwd
    log_path = work / "probe.log"
    work.mkdir(parents=True, exist_ok=True)
    log.info("probe: serving %s in %s on this CPU (%s); log %s",
             model_dir.name, ", ".join(v["name"] for v in variants), p.isa, log_path)
    with log_path.open("w") as logf:
        proc = subprocess.run(
            [python, "-m", "serving.engine._probe_vllm", json.dumps(spec)], cwd=repo_root(), env=env,
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


def measured_quant_scheme(p: Platform) -> tuple[Scheme | None, str]:
    """The scheme to quantize to for this machine, or None when none can win here, and why.

    On a CPU this runs the platform probe (serving/engine/probe.py; minutes the first time on a machine,
    then read from its cache): a scheme the CPU serves slower than the unquantized model, or
    incorrectly, is not worth quantizing to. GPUs keep :func:`default_quant_scheme`.
    """
    if p.has_gpu:
        return default_quant_scheme(p), "GPU: W4A16 (Marlin/Machete kernels)"
    result = run_probe(p)
    return result.scheme, f"platform probe ({result.taken_at}): {result.why}"  # type: ignore[return-value]


def plan_scheme(requested: str, target: Target) -> tuple[str | None, str]:
    """The scheme the loop's quantized candidate gets, or None (skip it), and why.

    ``auto`` for this machine's CPU asks the platform probe, which measures what the CPU serves
    faster (cached per machine): quantizing to a scheme the target runs slower costs minutes and
    cannot win. An explicit scheme in the config is used as given. (Here, not in
    training/quantize.py: the probe serves models, so it sits on the serving floor.)
    """
    if requested != "auto":
        return choose_scheme(requested, target), "set in the quantize config"
    if target != "this-machine":
        return choose_scheme(requested, target), f"the default for target {target}"
    scheme, why = measured_quant_scheme(target_platform(target))
    return (choose_scheme(scheme, target) if scheme else None), why
