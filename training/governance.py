"""Governance of training rows before anything is written: PII scrub, decontamination, dedup, split.

Each step returns the rows it keeps and counts what it changed or dropped, for the manifest.

- PII scrub: every message of every row goes through the gateway's detector
  (:func:`guardrails.pii.default_detector`, one piece of code), values become ``<ENTITY_TYPE>``.
- Decontamination: a row is dropped when its prompt or any of its answers (completion, chosen,
  rejected) shares a word n-gram with any eval item the project ships (``evals/tasks/**/*.jsonl``:
  the item's ``prompt``, and its ``reference`` answer and ``fact`` where it has them), so neither
  an eval prompt nor the answer it is scored against reaches training. A text shorter than n
  words counts as one gram, so it overlaps when it appears whole inside the other text.
- Dedup: exact duplicates (same normalized prompt and target) are dropped; prompts are grouped
  into clusters of near-duplicates (Jaccard similarity of word 3-gram shingles), and each cluster
  keeps at most ``max_sft_per_prompt`` SFT rows and ``max_dpo_per_prompt`` pairs, preferring edits.
- Split: whole clusters go to train or held-out, so no normalized prompt is on both sides.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from guardrails.pii import default_detector
from training.preferences import DPO_SOURCES, SFT_SOURCES, normalize_text, prompt_key

TARGET_FIELDS = ("completion", "chosen", "rejected")


# -- PII ----------------------------------------------------------------------------------------
def scrub_pii(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Redact PII in every message of every row (prompt and targets).

    Returns:
        (rows with redacted text, {"rows_changed": n, "entities": {type: count}}).
    """
    detector = default_detector()
    entities: Counter[str] = Counter()
    changed = 0
    out = []
    for row in rows:
        row = dict(row)
        touched = False
        for field in ("prompt", *TARGET_FIELDS):
            if field not in row:
                continue
            msgs = []
            for m in row[field]:
                text, found = detector.redact(m["content"])
                if found:
                    touched = True
                    entities.update(found)
                msgs.append({"role": m["role"], "content": text})
            row[field] = msgs
        changed += touched
        out.append(row)
    return out, {"rows_changed": changed, "entities": dict(entities)}


# -- decontamination ----------------------------------------------------------------------------
def user_text(row: dict[str, Any]) -> str:
    """The user turns of a row's prompt, normalized (what decontamination and dedup compare)."""
    return normalize_text(" ".join(m["content"] for m in row["prompt"] if m["role"] == "user"))


EVAL_TEXT_FIELDS = ("prompt", "reference", "fact")
"""Fields of an eval item that training must never see: the question and what it is scored against."""


def load_eval_prompts(patterns: list[str], root: Path) -> dict[str, list[str]]:
    """Every eval item's held-out texts, by file, from the glob ``patterns`` (relative to ``root``).

    Prompts are listed under the file's path; reference answers and facts under
    ``<path>#reference`` and ``<path>#fact``, so the manifest says which kind a dropped row hit.

    Raises:
        ValueError: an eval file line that is not JSON (evals must be readable to be honest).
    """
    by_file: dict[str, list[str]] = {}
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(root / pattern)
        for path in sorted(glob.glob(full, recursive=True)):
            texts: dict[str, list[str]] = {f: [] for f in EVAL_TEXT_FIELDS}
            for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"eval file {path} line {lineno}: invalid JSON ({err.msg})"
                    ) from None
                for f in EVAL_TEXT_FIELDS:
                    if isinstance(item, dict) and isinstance(item.get(f), str) and item[f].strip():
                        texts[f].append(item[f])
            rel = Path(path).resolve()
            name = str(rel.relative_to(root) if rel.is_relative_to(root) else rel)
            by_file[name] = texts["prompt"]
            for f in EVAL_TEXT_FIELDS[1:]:
                if texts[f]:
                    by_file[f"{name}#{f}"] = texts[f]
    return by_file


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class EvalIndex:
    """Word n-grams of the eval prompts, for overlap checks (n configurable)."""

    def __init__(self, eval_prompts: dict[str, list[str]], n: int) -> None:
        self.n = n
        self.items = [(f, normalize_text(p).split()) for f, ps in eval_prompts.items() for p in ps]
        self.items = [(f, toks) for f, toks in self.items if toks]
        self._by_len: dict[int, dict[tuple[str, ...], str]] = {}

    def _index(self, k: int) -> dict[tuple[str, ...], str]:
        """All k-grams of the eval prompts that have at least k words -> the file they are from."""
        if k not in self._by_len:
            idx: dict[tuple[str, ...], str] = {}
            for f, toks in self.items:
                for g in _grams(toks, k):
                    idx.setdefault(g, f)
            self._by_len[k] = idx
        return self._by_len[k]

    def overlap(self, text: str, short_text_inside: bool = True) -> str | None:
        """The eval file that ``text`` overlaps with, or None.

        Args:
            text: a prompt or an answer.
            short_text_inside: a ``text`` shorter than n words overlaps when it appears whole
                inside an eval item (right for prompts; an answer as short as "Yes." would
                otherwise hit any item containing the word).
        """
        toks = normalize_text(text).split()
        if not toks:
            return None
        k = min(self.n, len(toks))  # a short row counts as one gram: found whole inside an item
        if k == self.n or short_text_inside:
            idx = self._index(k)
            for g in _grams(toks, k):
                if g in idx:
                    return idx[g]
        # Eval items shorter than n words: found whole inside the row.
        row_grams: dict[int, set[tuple[str, ...]]] = {}
        for f, etoks in self.items:
            if len(etoks) < self.n and len(etoks) <= len(toks):
                grams = row_grams.setdefault(len(etoks), _grams(toks, len(etoks)))
                if tuple(etoks) in grams:
                    return f
        return None


def decontaminate(
    rows: list[dict[str, Any]], index: EvalIndex
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Drop rows whose prompt or answers overlap an eval item's prompt, reference answer or fact.

    Returns (kept rows, drops by eval file; ``<file>#reference`` when an answer was the hit).
    """
    kept, dropped = [], Counter()
    for row in rows:
        hit = index.overlap(user_text(row))
        for answer in (m["content"] for f in TARGET_FIELDS for m in row.get(f, [])):
            hit = hit or index.overlap(answer, short_text_inside=False)
        if hit is None:
            kept.append(row)
        else:
            dropped[hit] += 1
    return kept, dropped


# -- dedup --------------------------------------------------------------------------------------
def _shingles(text: str, k: int = 3) -> frozenset[str]:
    toks = text.split()
    if len(toks) <= k:
        return frozenset([" ".join(toks)])
    return frozenset(" ".join(toks[i : i + k]) for i in range(len(toks) - k + 1))


def cluster_prompts(keys: list[str], texts: dict[str, str], threshold: float) -> dict[str, str]:
    """Group prompt keys whose user texts are near-duplicates; key -> its cluster's first key.

    Candidates come from an inverted index over shingles, so only texts that share a shingle are
    compared (Jaccard similarity >= ``threshold`` joins a cluster).
    """
    rep: dict[str, str] = {}
    shingles: dict[str, frozenset[str]] = {}
    index: dict[str, list[str]] = {}
    for key in keys:
        if key in rep:
            continue
        sh = _shingles(texts[key])
        best = None
        for cand in dict.fromkeys(c for s in sh for c in index.get(s, ())):
            other = shingles[cand]
            if len(sh & other) / len(sh | other) >= threshold:
                best = cand
                break
        if best is None:  # a new cluster representative
            rep[key] = key
            shingles[key] = sh
            for s in sh:
                index.setdefault(s, []).append(key)
        else:
            rep[key] = rep[best]
    return rep


def _target_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(normalize_text(row[f][0]["content"]) for f in TARGET_FIELDS if f in row)


def dedup(
    rows: list[dict[str, Any]], clusters: dict[str, str], per_prompt: int, priority: tuple[str, ...]
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Keep at most ``per_prompt`` rows per prompt cluster, best source first, no exact repeats."""
    rank = {s: i for i, s in enumerate(priority)}
    order = sorted(range(len(rows)), key=lambda i: (rank.get(rows[i]["source"], len(rank)), i))
    seen: set[tuple] = set()
    kept_per_cluster: Counter[str] = Counter()
    first_key: dict[str, str] = {}
    keep, drops = set(), Counter()
    for i in order:
        row = rows[i]
        key = prompt_key(row["prompt"])
        exact = (key, _target_key(row))
        cluster = clusters[key]
        if exact in seen:
            drops["exact_duplicate"] += 1
        elif kept_per_cluster[cluster] >= per_prompt:
            drops["same_prompt" if first_key.get(cluster) == key else "near_duplicate_prompt"] += 1
        else:
            seen.add(exact)
            kept_per_cluster[cluster] += 1
            first_key.setdefault(cluster, key)
            keep.add(i)
    return [rows[i] for i in sorted(keep)], drops


# -- split --------------------------------------------------------------------------------------
def heldout_clusters(clusters: set[str], fraction: float, seed: int) -> set[str]:
    """The clusters that go to held-out: the first ``ceil(fraction * n)`` by a seeded hash.

    Hash order keeps the choice stable when new prompts arrive (a prompt does not move sides).
    At least one cluster is held out when ``fraction > 0`` and there are two or more.
    """
    if fraction <= 0 or len(clusters) < 2:
        return set()
    ordered = sorted(clusters, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    k = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    return set(ordered[:k])


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """Content hash of rows (order-sensitive, key-order independent)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


__all__ = [
    "DPO_SOURCES",
    "SFT_SOURCES",
    "EvalIndex",
    "cluster_prompts",
    "decontaminate",
    "dedup",
    "heldout_clusters",
    "load_eval_prompts",
    "rows_hash",
    "scrub_pii",
    "user_text",
]
