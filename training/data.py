"""The data stage: served logs + feedback -> governed SFT and DPO datasets with provenance.

    sources (log store window, JSONL files) -> rows (training/preferences.py)
      -> PII scrub -> decontamination -> dedup -> split by prompt (training/governance.py)
      -> DatasetDict(sft, dpo, heldout_sft, heldout_dpo) + manifest.json + README.md

The dataset is saved with ``save_to_disk(<stage out>/dataset)`` in TRL's conversational formats:
``sft`` rows are prompt-completion (``prompt``: messages ending with the user turn,
``completion``: one assistant message), ``dpo`` rows are ``prompt``/``chosen``/``rejected``; every
row also has ``request_ids``, ``feedback_ids`` and ``source``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from training.config import StrictModel, data_dir, repo_root
from training.data_sources import DataError, SourceBatch, load_jsonl, load_logstore
from training.governance import (
    EvalIndex,
    cluster_prompts,
    decontaminate,
    dedup,
    heldout_clusters,
    load_eval_prompts,
    rows_hash,
    scrub_pii,
    user_text,
)
from training.preferences import DPO_SOURCES, SFT_SOURCES, build_rows, prompt_key
from training.runs import StageDir, fingerprint_obj, new_run_id
from training.trust import TrustConfig, apply_trust

log = logging.getLogger(__name__)

SPLITS = ("sft", "dpo", "heldout_sft", "heldout_dpo")


class LogSourceConfig(StrictModel):
    """Which part of the gateway's log store to read."""

    enabled: bool = Field(True, description="Read the log store (false: JSONL files only).")
    url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data dir>/logs.db."
    )
    since: datetime | None = Field(
        None, description="Window start (feedback time, inclusive), ISO 8601."
    )
    until: datetime | None = Field(
        None, description="Window end (exclusive), ISO 8601; default now."
    )
    last_hours: float | None = Field(
        None, gt=0, description="Window = the last N hours before `until` (instead of `since`)."
    )
    tenants: list[str] = Field(default_factory=list, description="Only these tenants (empty: all).")
    releases: list[str] = Field(
        default_factory=list, description="Only answers of these releases (empty: all)."
    )

    @model_validator(mode="after")
    def _one_start(self) -> LogSourceConfig:
        if self.since is not None and self.last_hours is not None:
            raise ValueError("set either since or last_hours, not both")
        return self

    def window(self) -> tuple[datetime | None, datetime | None]:
        """The resolved [since, until) window, timezone-aware UTC."""
        aware = lambda t: t if t is None or t.tzinfo else t.replace(tzinfo=UTC)  # noqa: E731
        until = aware(self.until)
        since = aware(self.since)
        if self.last_hours is not None:
            since = (until or datetime.now(UTC)) - timedelta(hours=self.last_hours)
        return since, until


class GovernanceConfig(StrictModel):
    """PII scrub, decontamination, dedup and split settings."""

    scrub_pii: bool = Field(True, description="Redact PII in every message with guardrails.pii.")
    eval_globs: list[str] = Field(
        default_factory=lambda: ["evals/tasks/**/*.jsonl"],
        description="Eval item files (field `prompt`) to decontaminate against, relative to the repo.",
    )
    ngram: int = Field(8, ge=1, description="Word n-gram size of the eval overlap check.")
    near_dup_threshold: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Jaccard similarity of word 3-gram shingles that makes two prompts near-duplicates.",
    )
    max_sft_per_prompt: int = Field(1, ge=1, description="SFT rows kept per prompt cluster.")
    max_dpo_per_prompt: int = Field(2, ge=1, description="DPO pairs kept per prompt cluster.")
    max_rating_pairs: int = Field(
        2, ge=1, description="Positive-vs-negative pairs built per prompt."
    )
    heldout_fraction: float = Field(
        0.15, ge=0, lt=1, description="Share of prompt clusters held out."
    )
    seed: int = Field(0, description="Seed of the held-out assignment.")


class DataConfig(StrictModel):
    """Config of the data stage (`alignloop data build`)."""

    run_dir: str | None = Field(
        None, description="The run folder; default <data dir>/runs/<new run id>."
    )
    logstore: LogSourceConfig = Field(
        default_factory=LogSourceConfig, description="Log store source."
    )
    jsonl: list[str] = Field(
        default_factory=list, description="JSONL files in OpenAI chat formats."
    )
    governance: GovernanceConfig = Field(
        default_factory=GovernanceConfig, description="Governance."
    )
    trust: TrustConfig = Field(
        default_factory=TrustConfig,
        description="Which tenants and whose feedback may train the model (training/trust.py).",
    )


@dataclass
class DataResult:
    """What the data stage produced."""

    dataset_path: str
    manifest_path: str
    card_path: str
    stage_path: str
    counts: dict[str, int]
    simulated_feedback: int


def _features() -> dict[str, Any]:
    from datasets import Features, List, Value

    msgs = List({"role": Value("string"), "content": Value("string")})
    ids = {
        "request_ids": List(Value("string")),
        "feedback_ids": List(Value("string")),
        "source": Value("string"),
    }
    return {
        "sft": Features({"prompt": msgs, "completion": msgs, **ids}),
        "dpo": Features({"prompt": msgs, "chosen": msgs, "rejected": msgs, **ids}),
    }


def _to_dataset(rows: list[dict[str, Any]], features: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def read_sources(cfg: DataConfig) -> SourceBatch:
    """Read every configured source into one batch."""
    if not cfg.logstore.enabled and not cfg.jsonl:
        raise DataError("no source: enable logstore or list jsonl files")
    batch = SourceBatch()
    for path in cfg.jsonl:
        load_jsonl(path, batch)
    if cfg.logstore.enabled:
        from serving.logstore import default_url

        since, until = cfg.logstore.window()
        try:
            load_logstore(
                cfg.logstore.url or default_url(),
                since,
                until,
                cfg.logstore.tenants or None,
                cfg.logstore.releases or None,
                batch,
            )
        except DataError as err:
            if not batch.exchanges:  # nothing else to train on: an empty window is an error
                raise
            batch.stats["logstore"] = {"skipped": str(err)}
    return batch


def govern(
    sft: list[dict[str, Any]], dpo: list[dict[str, Any]], g: GovernanceConfig
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Scrub, decontaminate, dedup and split the rows. Returns (rows by split, manifest parts)."""
    report: dict[str, Any] = {}
    # Row counts after each step: what came in and what each step dropped.
    steps = [{"step": "built", "sft": len(sft), "dpo": len(dpo)}]
    if g.scrub_pii:
        sft, pii_sft = scrub_pii(sft)
        dpo, pii_dpo = scrub_pii(dpo)
        report["pii_scrub"] = {"sft": pii_sft, "dpo": pii_dpo}
    eval_prompts = load_eval_prompts(g.eval_globs, repo_root())
    index = EvalIndex(eval_prompts, g.ngram)
    sft, con_sft = decontaminate(sft, index)
    dpo, con_dpo = decontaminate(dpo, index)
    report["decontamination"] = {
        "ngram": g.ngram,
        "eval_files": {f: len(p) for f, p in eval_prompts.items()},
        "eval_items_hash": fingerprint_obj(eval_prompts),
        "dropped": {"sft": sum(con_sft.values()), "dpo": sum(con_dpo.values())},
        "dropped_by_eval_file": dict(con_sft + con_dpo),
    }
    steps.append({"step": "decontamination", "sft": len(sft), "dpo": len(dpo)})
    keys = [prompt_key(r["prompt"]) for r in sft + dpo]
    texts = {prompt_key(r["prompt"]): user_text(r) for r in sft + dpo}
    clusters = cluster_prompts(keys, texts, g.near_dup_threshold)
    sft, dd_sft = dedup(sft, clusters, g.max_sft_per_prompt, SFT_SOURCES)
    dpo, dd_dpo = dedup(dpo, clusters, g.max_dpo_per_prompt, DPO_SOURCES)
    report["dedup"] = {
        "threshold": g.near_dup_threshold,
        "prompt_clusters": len(set(clusters.values())),
        "dropped_sft": dict(dd_sft),
        "dropped_dpo": dict(dd_dpo),
    }
    steps.append({"step": "dedup", "sft": len(sft), "dpo": len(dpo)})
    held = heldout_clusters(set(clusters.values()), g.heldout_fraction, g.seed)
    is_held = lambda r: clusters[prompt_key(r["prompt"])] in held  # noqa: E731
    splits = {
        "sft": [r for r in sft if not is_held(r)],
        "dpo": [r for r in dpo if not is_held(r)],
        "heldout_sft": [r for r in sft if is_held(r)],
        "heldout_dpo": [r for r in dpo if is_held(r)],
    }
    report["split"] = {
        "heldout_fraction": g.heldout_fraction,
        "seed": g.seed,
        "heldout_prompt_clusters": len(held),
    }
    steps.append({"step": "split", **{s: len(r) for s, r in splits.items()}})
    return splits, {"steps": steps, **report}


def run(cfg: DataConfig) -> DataResult:
    """Build the governed datasets from the configured sources.

    Raises:
        DataError: no feedback in the window, an unreadable source, or nothing left to train on.
    """
    batch = read_sources(cfg)
    sources_hash = fingerprint_obj(
        {
            "exchanges": [asdict(e) for e in batch.exchanges.values()],
            "feedback": [asdict(f) for f in batch.feedback],
            "curated": sorted(batch.curated),
            "bad_lines": batch.bad_lines,
        }
    )
    run_dir = Path(cfg.run_dir) if cfg.run_dir else data_dir() / "runs" / new_run_id("data")
    stage = StageDir(run_dir, "data", cfg, inputs={"sources": sources_hash})
    if (done := stage.cached_result()) is not None:
        return DataResult(**done)
    stage.start()

    batch, trust = apply_trust(batch, cfg.trust)
    sft, dpo, built = build_rows(batch, cfg.governance.max_rating_pairs)
    if not sft and not dpo:
        raise DataError(
            f"no training rows from {len(batch.feedback)} feedback events and "
            f"{len(batch.exchanges)} exchanges: {built['feedback_unusable'] or 'no usable feedback'}"
            f"; trust rules: {json.dumps({k: v for k, v in trust.items() if k != 'rules'})}"
        )
    splits, report = govern(sft, dpo, cfg.governance)
    if not splits["sft"] and not splits["dpo"]:
        raise DataError(
            f"governance left no training rows: {json.dumps(report, default=str)[:800]}"
        )

    from datasets import DatasetDict

    feats = _features()
    dsd = DatasetDict(
        {s: _to_dataset(rows, feats["sft" if "sft" in s else "dpo"]) for s, rows in splits.items()}
    )
    dataset_path = stage.out / "dataset"
    # One shard per split: datasets 5.2 writes an empty split as 0 shards and then cannot load it.
    dsd.save_to_disk(str(dataset_path), num_shards={s: 1 for s in SPLITS})

    simulated = sum(1 for f in batch.feedback if f.actor_role == "simulated")  # set by the server
    counts = {s: len(rows) for s, rows in splits.items()}
    manifest = {
        "stage": "data",
        "created_at": datetime.now(UTC).isoformat(),
        "window": batch.stats.get("logstore", {}).get("window"),
        "sources": {
            **batch.stats,
            "exchanges_read": len(batch.exchanges),
            "curated_jsonl_rows": len(batch.curated),
        },
        "bad_lines": batch.bad_lines,
        "feedback": {
            "total": len(batch.feedback),
            "by_kind": dict(Counter(f.kind for f in batch.feedback)),
            "simulated": simulated,
            "simulated_note": (
                "feedback from simulated users (training/simulate.py), not real people"
            )
            if simulated
            else None,
        },
        "rows_built": {"sft": built["built_sft"], "dpo": built["built_dpo"]},
        "feedback_unusable": built["feedback_unusable"],
        "conflicts": built["conflicts"],
        "trust": trust,
        "governance": report,
        "final": counts,
        "hashes": {"sources": sources_hash, **{s: rows_hash(r) for s, r in splits.items()}},
        "config": cfg.model_dump(mode="json"),
    }
    manifest_path = stage.out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    card_path = stage.out / "README.md"
    card_path.write_text(dataset_card(manifest))

    result = DataResult(
        dataset_path=str(dataset_path),
        manifest_path=str(manifest_path),
        card_path=str(card_path),
        stage_path=str(stage.path),
        counts=counts,
        simulated_feedback=simulated,
    )
    stage.save(asdict(result))
    log.info("data: %s -> %s", counts, dataset_path)
    return result


def dataset_card(m: dict[str, Any]) -> str:
    """A dataset card (README.md) for the manifest ``m``."""
    fb = m["feedback"]
    sim = (
        f"**{fb['simulated']} of {fb['total']} feedback events came from simulated users** "
        "(training/simulate.py scoring answers with evals/policy.py), not from real people.\n\n"
        if fb["simulated"]
        else ""
    )
    gov = m["governance"]
    lines = [
        "---",
        "license: other",
        "task_categories: [text-generation]",
        "tags: [alignloop, sft, dpo]",
        "---",
        "",
        "# alignloop feedback dataset",
        "",
        f"Built {m['created_at']} by the alignloop data stage from served request logs and user "
        "feedback.",
        "",
        sim + "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {n} |" for s, n in m["final"].items()],
        "",
        "`sft`: conversational prompt-completion (TRL SFTTrainer). `dpo`: prompt/chosen/rejected "
        "(TRL DPOTrainer). Every row lists the `request_ids` and `feedback_ids` it came from and "
        "its `source` (edit, rating, curated, preference, preference_text, rating_pair). Held-out "
        "splits share no normalized prompt (or near-duplicate) with the training splits.",
        "",
        "## How rows are made",
        "",
        "- SFT: answers rated >= 4 and never <= 2; edits (the edit is the target); JSONL rows "
        "without feedback (curated).",
        "- DPO: edit vs original; explicit preference between two answers to the same prompt; "
        "better text vs answer; positively vs negatively rated answers to the same prompt.",
        "- Conflicts: an answer rated both >= 4 and <= 2 is not used; the latest edit wins; an "
        "edited answer is not an SFT target through its rating; disagreeing preferences cancel.",
        "",
        "## Governance",
        "",
        "- Rows after each step: "
        + " -> ".join(
            f"{st['step']} {', '.join(f'{k} {v}' for k, v in st.items() if k != 'step')}"
            for st in gov["steps"]
        ),
        f"- PII scrub (Presidio, guardrails/pii.py): {json.dumps(gov.get('pii_scrub', 'off'))}",
        f"- Decontamination ({gov['decontamination']['ngram']}-gram overlap with "
        f"{sum(gov['decontamination']['eval_files'].values())} eval items): dropped "
        f"{json.dumps(gov['decontamination']['dropped'])}",
        f"- Dedup (near-duplicate Jaccard >= {gov['dedup']['threshold']}): dropped sft "
        f"{json.dumps(gov['dedup']['dropped_sft'])}, dpo {json.dumps(gov['dedup']['dropped_dpo'])}",
        f"- Conflicts: {json.dumps(m['conflicts'])}; unusable feedback: "
        f"{json.dumps(m['feedback_unusable'])}; bad input lines: {len(m['bad_lines'])}",
        "",
        "See manifest.json for every count, the window and the content hashes.",
        "",
    ]
    return "\n".join(lines)
