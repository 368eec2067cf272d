"""Typed configs of the eval suites (configs/evals.yaml) and the endpoint a suite runs against.

Metric names are flat, dotted and stable, so a report and the gate can address them
(``quality.capability.capitals.answer_match``, ``safety.attack_block_rate``,
``perf.ttft_p95_ms``, ``cost.usd_per_1m_output_tokens``); see evals/README in the report of
issue 7 and :mod:`evals.gate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ground.config import StrictModel, repo_root
from training.base_model import default_dir, materialize

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint: the gateway in the product, vLLM directly in tests."""

    base_url: str
    """OpenAI base URL ending in ``/v1``."""
    api_key: str = "EMPTY"
    model: str = "model"

    def __post_init__(self) -> None:
        if not self.base_url.rstrip("/").endswith("/v1"):
            raise ValueError(f"endpoint base_url must end with /v1 (got {self.base_url!r})")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def root_url(self) -> str:
        return self.url[: -len("/v1")]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


class QualityConfig(StrictModel):
    """Quality suite: lm-eval tasks over the chat endpoint, preference accuracy over logprobs."""

    tasks_dir: str = Field(str(TASKS_DIR), description="Folder of lm-eval task YAMLs (include_path).")
    capability_tasks: list[str] = Field(
        default_factory=lambda: ["alignloop_arithmetic", "alignloop_capitals", "alignloop_elements"],
        description="lm-eval task names of the capability-retention sets (reported per task).",
    )
    instruction_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks of verifiable instructions (lm-eval's IFEval checkers), per task.",
    )
    policy_task: str | None = Field(
        "alignloop_policy", description="lm-eval task of held-out policy prompts; null to skip."
    )
    limit: int | None = Field(
        None, gt=0,
        description="Items per task (None = all): the first N (the files put one item of every "
        "family first). With a sequential gate this is each task's budget over all looks.",
    )
    items: dict[str, tuple[int, int]] | None = Field(
        None,
        description="Set by the loop for a sequential gate's look: per task, the [start, stop) "
        "item indices to evaluate (tasks not named are skipped; `limit` is then not used).",
    )
    num_concurrent: int = Field(8, ge=1, description="Concurrent requests lm-eval sends.")
    max_gen_toks: int = Field(96, gt=0, description="Answer token cap for tasks that do not set one.")
    timeout_s: int = Field(300, gt=0, description="Per-request timeout.")
    tokenizer: str | None = Field(
        None,
        description="HF tokenizer folder to count answer tokens; None = the embedded base model's.",
    )
    preference_dataset: str | None = Field(
        None, description="datasets folder (DatasetDict) with the held-out pairs; None = skip."
    )
    preference_split: str = Field("heldout_dpo", description="Split of held-out preference pairs.")
    preference_limit: int = Field(32, gt=0, description="Pairs scored (each costs two prompt passes).")


class SafetyConfig(StrictModel):
    """Safety suite: attack prompts (should be stopped) and benign prompts (should be answered)."""

    attacks_file: str = Field(str(TASKS_DIR / "safety" / "attacks.jsonl"), description="Attack items (JSONL).")
    benign_file: str = Field(str(TASKS_DIR / "safety" / "benign.jsonl"), description="Benign items (JSONL).")
    max_tokens: int = Field(64, gt=0, description="Answer token cap per request.")
    num_concurrent: int = Field(8, ge=1, description="Concurrent requests.")
    timeout_s: float = Field(120, gt=0, description="Per-request timeout.")
    limit: int | None = Field(
        None, gt=0,
        description="Items per file (the first N: the files are shuffled); None = all. With a "
        "sequential gate this is each file's budget over all looks.",
    )
    items: dict[Literal["attack", "benign"], tuple[int, int]] | None = Field(
        None,
        description="Set by the loop for a sequential gate's look: per file, the [start, stop) item "
        "indices to send (a file not named is skipped; `limit` is then not used).",
    )
    count_refusals: bool = Field(
        True,
        description="Count a model refusal as stopping an attack (and as over-blocking a benign item).",
    )


class SLO(StrictModel):
    """Service-level objective: a request is 'good' when it meets every bound."""

    ttft_ms: float = Field(1000, gt=0, description="p95 time to first token bound, ms.")
    tpot_ms: float = Field(100, gt=0, description="p95 time per output token bound, ms.")


class PerfConfig(StrictModel):
    """Latency/throughput with `vllm bench serve`: the workload's concurrency, a grid, realistic prompts."""

    concurrency: list[int] = Field(
        default_factory=lambda: [1, 4, 8],
        description="max-concurrency levels measured besides the workload's (may be empty).",
    )
    workload_concurrency: int | None = Field(
        None, ge=1,
        description="Requests in flight of the real workload (the loop takes it from the logs): measured "
        "first, `repeats` times, and the level the headline and the gate read; None = the grid's highest.",
    )
    requests_per_level: int = Field(
        50, ge=1,
        description="Requests per run of a level (and at least the level's concurrency); below 50 a "
        "p95 is close to the maximum of a handful and the report labels it 'max of n'.",
    )
    repeats: int = Field(2, ge=1, description="Runs of the workload level; the report shows their spread.")
    input_len: int = Field(128, gt=0, description="Random prompt length in tokens.")
    output_len: int = Field(32, gt=0, description="Output tokens per request (EOS ignored).")
    slo: SLO = Field(default_factory=SLO, description="Latency SLO (also sent as --goodput).")
    percentiles: list[int] = Field(
        default_factory=lambda: [50, 90, 95, 99], description="Percentiles of TTFT/TPOT/ITL/E2EL."
    )
    realistic_prompts: str | None = Field(
        None, description="JSONL with a `prompt` field (held-out logs) for a realistic run; None = skip."
    )
    realistic_num_prompts: int = Field(8, ge=0, description="Requests of the realistic run (0 = skip it).")
    realistic_concurrency: int = Field(2, gt=0, description="Concurrency of the realistic run.")
    realistic_output_len: int = Field(64, gt=0, description="Output cap of the realistic run.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder for the benchmark; None = the embedded base model's."
    )
    model_dir: str | None = Field(None, description="Served model folder, for its size on disk.")
    vllm_root_url: str | None = Field(
        None, description="vLLM's own root URL (for /metrics KV-cache capacity) when behind a gateway."
    )
    direct_base_url: str | None = Field(
        None,
        description="vLLM's /v1 URL: a c=1 run there too gives the gateway's (guardrails') latency share.",
    )
    direct_model: str | None = Field(
        None, description="Model name vLLM serves under at direct_base_url; None = the endpoint's."
    )
    timeout_s: float = Field(600, gt=0, description="Limit for one benchmark run.")


class CostConfig(StrictModel):
    """$ per hour of the machine that serves, to turn throughput at the SLO into $."""

    machine: str = Field("cpu-box", description="Key of `usd_per_hour` for the machine being measured.")
    usd_per_hour: dict[str, float] = Field(
        # Documented defaults (on-demand list prices, 2026): a 2-vCPU x86 VM ~ $0.10/h;
        # one H100 80GB on a GPU cloud ~ $3.00/h. Override with your own contract prices.
        default_factory=lambda: {"cpu-box": 0.10, "h100": 3.00},
        description="$/hour per machine kind.",
    )


class EvalsConfig(StrictModel):
    """All suites (configs/evals.yaml)."""

    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality suite.")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Safety suite.")
    perf: PerfConfig = Field(default_factory=PerfConfig, description="Latency/throughput suite.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Cost model.")


def default_config_path() -> Path:
    return repo_root() / "configs" / "evals.yaml"


def default_tokenizer() -> str:
    """The embedded base model's folder (same tokenizer as every variant derived from it)."""
    path = default_dir()
    return str(path) if (path / "config.json").is_file() else materialize().path
