"""The data stage: served logs + feedback -> governed SFT, DPO and KTO datasets with provenance.

    sources (log store window, JSONL files) -> rows (training/preferences.py) -> PII scrub
      -> ledger: this window's rows kept beside every earlier window's (training/ledger.py)
      -> the mix of windows: decontamination -> cross-window conflicts -> answers of older
         releases -> selection (all windows, or new ones + replay) -> dedup -> split by prompt
         (training/governance.py, training/ledger.py)
      -> DatasetDict(sft, dpo, kto, heldout_*) + manifest.json + README.md

The dataset is saved with ``save_to_disk(<stage out>/dataset)`` in TRL's conversational formats:
``sft`` rows are prompt-completion (``prompt``: messages ending with the user turn,
``completion``: one assistant message), ``dpo`` rows are ``prompt``/``chosen``/``rejected``, ``kto``
rows are unpaired ``prompt``/``completion``/``label`` (thumbs up or down); every row also has
``request_ids``, ``feedback_ids``, ``source``, the ledger ``window`` it came from and the
``releases`` that served its answers.

A window with too little new feedback is not an error: the result says
``skip_reason: "skipped: not enough new feedback (...)"`` and no dataset is written.
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

from ground.config import StrictModel, data_dir, repo_root
from ground.runs import StageDir, fingerprint_obj, new_run_id
from training import ledger as mix
from training.data_sources import DataError, EmptyWindow, SourceBatch, load_jsonl, load_logstore
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
from training.preferences import DPO_SOURCES, KTO_SOURCES, SFT_SOURCES, build_rows, prompt_key
from training.trust import TrustConfig, apply_trust, cap_tenant_rows

log = logging.getLogger(__name__)

SPLITS = ("sft", "dpo", "kto", "heldout_sft", "heldout_dpo", "heldout_kto")
TRAIN_SPLITS = mix.KINDS


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
    max_kto_per_prompt: int = Field(2, ge=1, description="Unpaired (KTO) rows kept per prompt cluster.")
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
    ledger: mix.MixConfig = Field(
        default_factory=mix.MixConfig,
        description="The ledger across windows and the mix of windows a run trains on.",
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
    dataset_version: str | None = None
    new_examples: int = 0
    skip_reason: str | None = None
    """Set when the window had too little new feedback: nothing to train on, not an error."""


def _features() -> dict[str, Any]:
    # lazy: datasets, pyarrow and pandas
    from datasets import Features, List, Value

    msgs = List({"role": Value("string"), "content": Value("string")})
    ids = {
        "request_ids": List(Value("string")),
        "feedback_ids": List(Value("string")),
        "source": Value("string"),
        "window": Value("string"),
        "releases": List(Value("string")),
    }
    return {
        "sft": Features({"prompt": msgs, "completion": msgs, **ids}),
        "dpo": Features({"prompt": msgs, "chosen": msgs, "rejected": msgs, **ids}),
        "kto": Features({"prompt": msgs, "completion": msgs, "label": Value("bool"), **ids}),
    }


def _to_dataset(rows: list[dict[str, Any]], features: Any) -> Any:
    # lazy: datasets, pyarrow and pandas
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
        # lazy: ground.logstore loads sqlalchemy
        from ground.logstore import default_url

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
        except EmptyWindow as err:  # a quiet window: the ledger decides whether that is enough
            batch.stats["logstore"]["note"] = str(err)
    return batch


def scrub(
    rows: dict[str, list[dict[str, Any]]], g: GovernanceConfig
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any] | str]:
    """Redact PII in every row of every kind before anything is kept (the ledger holds no PII)."""
    if not g.scrub_pii:
        return rows, "off"
    out, report = {}, {}
    for kind, items in rows.items():
        out[kind], report[kind] = scrub_pii(items)
    return out, report


def govern(
    rows: dict[str, list[dict[str, Any]]],
    g: GovernanceConfig,
    m: mix.MixConfig,
    new_windows: set[str],
    order: dict[str, int],
    current_releases: set[str],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The rules over the ledger's mix of windows, then dedup and split.

    Args:
        rows: every ledger row by kind (sft, dpo, kto) of the windows up to this one.
        g: governance settings; m: the mix settings.
        new_windows: windows the live model has not learned from.
        order: window id -> position (higher = newer).
        current_releases: releases whose answers count as current.

    Returns:
        (rows by split, manifest parts), with the row counts after every step.
    """
    report: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    count = lambda name: steps.append({"step": name, **{k: len(v) for k, v in rows.items()}})  # noqa: E731
    count("ledger")
    # Decontaminate the whole mix against today's eval sets: an eval item added since a window
    # was recorded still removes that window's overlapping rows.
    eval_prompts = load_eval_prompts(g.eval_globs, repo_root())
    index = EvalIndex(eval_prompts, g.ngram)
    dropped_by_file: Counter[str] = Counter()
    dropped: dict[str, int] = {}
    for kind in TRAIN_SPLITS:
        rows[kind], by_file = decontaminate(rows[kind], index)
        dropped[kind] = sum(by_file.values())
        dropped_by_file += by_file
    report["decontamination"] = {
        "ngram": g.ngram,
        "eval_files": {f: len(p) for f, p in eval_prompts.items()},
        "eval_items_hash": fingerprint_obj(eval_prompts),
        "dropped": dropped,
        "dropped_by_eval_file": dict(dropped_by_file),
    }
    count("decontamination")
    rows, report["conflicts_across_windows"] = mix.resolve_conflicts(rows, order, m.conflicts)
    count("conflicts across windows")
    rows, report["older_releases"] = mix.apply_release_policy(
        rows, current_releases, m.older_release, m.older_release_weight, m.seed
    )
    count("answers of older releases")
    rows, report["selection"] = mix.select(rows, new_windows, m)
    count("selection")

    # Newest window first, so the dedup keeps the latest feedback within a source's priority;
    # clusters are named after their oldest prompt, so the held-out side of a prompt is stable.
    oldest_first = sorted((r for k in TRAIN_SPLITS for r in rows[k]), key=lambda r: order[r["window"]])
    keys = [prompt_key(r["prompt"]) for r in oldest_first]
    texts = {prompt_key(r["prompt"]): user_text(r) for r in oldest_first}
    clusters = cluster_prompts(keys, texts, g.near_dup_threshold)
    caps = {
        "sft": (g.max_sft_per_prompt, SFT_SOURCES),
        "dpo": (g.max_dpo_per_prompt, DPO_SOURCES),
        "kto": (g.max_kto_per_prompt, KTO_SOURCES),
    }
    report["dedup"] = {"threshold": g.near_dup_threshold, "prompt_clusters": len(set(clusters.values()))}
    for kind, (cap, priority) in caps.items():
        newest_first = sorted(rows[kind], key=lambda r: -order[r["window"]])
        rows[kind], drops = dedup(newest_first, clusters, cap, priority)
        report["dedup"][f"dropped_{kind}"] = dict(drops)
    count("dedup")

    held = heldout_clusters(set(clusters.values()), g.heldout_fraction, g.seed)
    is_held = lambda r: clusters[prompt_key(r["prompt"])] in held  # noqa: E731
    splits = {}
    for kind in TRAIN_SPLITS:
        splits[kind] = [r for r in rows[kind] if not is_held(r)]
        splits[f"heldout_{kind}"] = [r for r in rows[kind] if is_held(r)]
    report["split"] = {
        "heldout_fraction": g.heldout_fraction,
        "seed": g.seed,
        "heldout_prompt_clusters": len(held),
    }
    steps.append({"step": "split", **{s: len(splits[s]) for s in SPLITS}})
    return splits, {"steps": steps, **report}


def _releases_of(rows: dict[str, list[dict[str, Any]]], batch: SourceBatch) -> None:
    """Record on every row the releases that served its answers (JSONL rows have none)."""
    for items in rows.values():
        for row in items:
            row["releases"] = [
                rel for rid in row["request_ids"]
                if (ex := batch.exchanges.get(rid)) is not None and (rel := ex.release)
            ]


def _live_view(cfg: mix.MixConfig) -> tuple[list[str], list[str]]:
    """(windows the live model learned from, current releases), as the caller set them: the flows
    read them from the live release's lineage (:func:`serving.releases.store.live_lineage`);
    unset means no live model (nothing learned, every answer current)."""
    return sorted(cfg.trained_windows or []), sorted(cfg.current_releases or [])


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def run(cfg: DataConfig) -> DataResult:
    """Record this window's rows in the ledger and build the governed datasets from the mix.

    Returns a result with ``skip_reason`` set (and no dataset) when the new windows hold fewer
    than ``ledger.min_new_rows`` new examples: a quiet window is not an error.

    Raises:
        DataError: an unreadable source, or (with ``min_new_rows: 0``) nothing left to train on.
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
    since, until = cfg.logstore.window() if cfg.logstore.enabled else (None, None)
    ledger = mix.Ledger(cfg.ledger.path or data_dir() / "ledger")
    window_id = run_dir.name
    trained, current = _live_view(cfg.ledger)
    known = ledger.get(window_id)
    end = known.order if known else (_iso(until) or datetime.now(UTC).isoformat(), window_id)
    earlier = [w for w in ledger.windows() if w.order <= end]
    stage = StageDir(run_dir, "data", cfg, inputs={
        "sources": sources_hash, "ledger": ledger.fingerprint(earlier, exclude=window_id),
        "trained_windows": trained, "current_releases": current,
    })
    if (done := stage.cached_result()) is not None:
        return DataResult(**done)
    stage.start()

    # Only feedback the trust rules accept (training/trust.py) reaches the ledger.
    batch, trust = apply_trust(batch, cfg.trust)
    sft, dpo, kto, built = build_rows(batch, cfg.governance.max_rating_pairs)
    rows, trust["tenant_share"] = cap_tenant_rows(
        {"sft": sft, "dpo": dpo, "kto": kto}, batch, cfg.trust.max_tenant_share
    )
    _releases_of(rows, batch)
    rows, pii = scrub(rows, cfg.governance)
    entry = ledger.record(window_id, _iso(since), _iso(until), rows)
    windows = ledger.upto(entry)
    order = {w.id: i for i, w in enumerate(windows)}
    new_windows = {w.id for w in windows if w.id not in trained}
    splits, report = govern(
        ledger.rows(windows), cfg.governance, cfg.ledger, new_windows, order, set(current)
    )
    report = {"pii_scrub": pii, **report}
    train = {k: splits[k] for k in TRAIN_SPLITS}
    n_new = mix.new_examples(train, new_windows)
    version = mix.dataset_version(splits)
    skip_reason = None
    if n_new < cfg.ledger.min_new_rows:
        skip_reason = (
            f"skipped: not enough new feedback ({n_new} new examples in "
            f"{len(new_windows)} window(s) the live model has not learned from; "
            f"ledger.min_new_rows is {cfg.ledger.min_new_rows})"
        )
        if trust["feedback_used"] < trust["feedback_in"]:
            skip_reason += (
                f"; the trust rules kept {trust['feedback_used']} of {trust['feedback_in']} "
                "feedback events (manifest: trust)"
            )
        log.info("data: %s", skip_reason)
    elif not any(train.values()):
        raise DataError(
            f"governance left no training rows: {json.dumps(report, default=str)[:800]}"
        )

    dataset_path = stage.out / "dataset"
    if skip_reason is None:
        # lazy: datasets, pyarrow and pandas
        from datasets import DatasetDict

        feats = _features()
        kind_of = lambda s: next(k for k in TRAIN_SPLITS if k in s)  # noqa: E731
        dsd = DatasetDict({s: _to_dataset(r, feats[kind_of(s)]) for s, r in splits.items()})
        # One shard per split: datasets 5.2 writes an empty split as 0 shards and then cannot load it.
        dsd.save_to_disk(str(dataset_path), num_shards={s: 1 for s in SPLITS})

    simulated = sum(1 for f in batch.feedback if f.actor_role == "simulated")  # set by the server
    counts = {s: len(rows) for s, rows in splits.items()}
    in_splits = {w.id: Counter() for w in windows}
    for s, items in splits.items():
        for r in items:
            in_splits[r["window"]][s] += 1
    manifest = {
        "stage": "data",
        "created_at": datetime.now(UTC).isoformat(),
        "window": batch.stats.get("logstore", {}).get("window"),
        "skipped": skip_reason,
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
                "feedback from simulated users (flows/simulate.py), not real people"
            )
            if simulated
            else None,
        },
        "rows_built": {"sft": built["built_sft"], "dpo": built["built_dpo"], "kto": built["built_kto"]},
        "feedback_unusable": built["feedback_unusable"],
        "conflicts": built["conflicts"],
        "trust": trust,
        "ledger": {
            "path": str(ledger.root),
            "window": window_id,
            "mix": cfg.ledger.model_dump(mode="json", exclude={"path"}),
            "trained_windows": trained,
            "current_releases": current,
            "new_windows": sorted(new_windows, key=order.__getitem__),
            "windows": [
                {"id": w.id, "since": w.since, "until": w.until, "rows": w.counts,
                 "new": w.id in new_windows, "in_splits": dict(in_splits[w.id])}
                for w in windows
            ],
            "train_windows": [
                w.id for w in windows if any(in_splits[w.id][k] for k in TRAIN_SPLITS)
            ],
            "new_examples": n_new,
            "dataset_version": version,
            "rows": {s: [mix.row_id(r) for r in items] for s, items in splits.items()},
        },
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
        dataset_path=str(dataset_path) if skip_reason is None else "",
        manifest_path=str(manifest_path),
        card_path=str(card_path),
        stage_path=str(stage.path),
        counts=counts,
        simulated_feedback=simulated,
        dataset_version=version,
        new_examples=n_new,
        skip_reason=skip_reason,
    )
    stage.save(asdict(result))
    log.info("data: %s (%s, %d new examples) -> %s", counts, version, n_new,
             skip_reason or dataset_path)
    return result


def dataset_card(m: dict[str, Any]) -> str:
    """A dataset card (README.md) for the manifest ``m``."""
    fb = m["feedback"]
    sim = (
        f"**{fb['simulated']} of {fb['total']} feedback events came from simulated users** "
        "(flows/simulate.py scoring answers with evals/policy.py), not from real people.\n\n"
        if fb["simulated"]
        else ""
    )
    gov = m["governance"]
    led = m["ledger"]
    lines = [
        "---",
        "license: other",
        "task_categories: [text-generation]",
        "tags: [alignloop, sft, dpo, kto]",
        "---",
        "",
        "# alignloop feedback dataset",
        "",
        f"Built {m['created_at']} by the alignloop data stage from served request logs and user "
        "feedback.",
        "",
        sim + (f"**Skipped: {m['skipped']}.** No dataset was written.\n\n" if m["skipped"] else "")
        + "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {n} |" for s, n in m["final"].items()],
        "",
        "`sft`: conversational prompt-completion (TRL SFTTrainer). `dpo`: prompt/chosen/rejected "
        "(TRL DPOTrainer). `kto`: unpaired prompt/completion/label (TRL KTOTrainer). Every row "
        "lists the `request_ids` and `feedback_ids` it came from, its `source` (edit, rating, "
        "curated, preference, preference_text, rating_pair), the ledger `window` it was recorded in "
        "and the `releases` that served its answers. Held-out splits share no normalized prompt "
        "(or near-duplicate) with the training splits.",
        "",
        f"## Windows (dataset version {led['dataset_version']})",
        "",
        f"Mix: {json.dumps(led['mix'])}. {led['new_examples']} new examples from windows the live "
        "model has not learned from.",
        "",
        "| window | rows recorded | new | rows in this dataset |",
        "|---|---|---|---|",
        *[f"| {w['id']} | {sum(w['rows'].values())} | {'yes' if w['new'] else 'no'} | "
          f"{sum(w['in_splits'].values())} |" for w in led["windows"]],
        "",
        "## How rows are made",
        "",
        "- SFT: answers rated >= 4 and never <= 2; edits (the edit is the target); JSONL rows "
        "without feedback (curated).",
        "- DPO: edit vs original; explicit preference between two answers to the same prompt; "
        "better text vs answer; positively vs negatively rated answers to the same prompt.",
        "- KTO: every answer rated >= 4 (desirable) or <= 2 (undesirable), paired or not.",
        "- Conflicts: an answer rated both >= 4 and <= 2 is not used; the latest edit wins; an "
        "edited answer is not an SFT target through its rating; disagreeing preferences cancel. "
        f"Across windows ({led['mix']['conflicts']}): {json.dumps(gov['conflicts_across_windows'])}.",
        f"- Answers of older releases ({led['mix']['older_release']}): "
        f"{json.dumps(gov['older_releases'])}.",
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
        f"{json.dumps(gov['dedup']['dropped_sft'])}, dpo {json.dumps(gov['dedup']['dropped_dpo'])}, "
        f"kto {json.dumps(gov['dedup']['dropped_kto'])}",
        f"- Conflicts: {json.dumps(m['conflicts'])}; unusable feedback: "
        f"{json.dumps(m['feedback_unusable'])}; bad input lines: {len(m['bad_lines'])}",
        "",
        "See manifest.json for every count, the window and the content hashes.",
        "",
    ]
    return "\n".join(lines)
