"""Feedback -> training rows: SFT rows and DPO pairs, each carrying the ids it came from.

Rules (documented in the dataset card and counted in the manifest):

- SFT rows: an answer rated positively (score >= 4) and not also negatively; an edited answer
  (the edit is the target); a JSONL exchange without feedback (curated data).
- DPO pairs: edit (chosen) vs the original answer (rejected); an explicit preference between two
  answers to the same prompt; a better text given as a preference vs the answer; a positively vs
  a negatively rated answer to the same normalized prompt (at most ``max_rating_pairs`` per prompt).
- KTO rows (unpaired): every answer rated positively (label true) or negatively (label false), for
  TRL's KTOTrainer, so thumbs that never pair up still teach something.
- Conflicts: an answer rated both >= 4 and <= 2 is used by no rating-based row; of several edits
  of one answer the latest wins; an edited answer is not also an SFT target through its positive
  rating (the edit says the user wanted something else); two preferences between the same answers
  that disagree cancel out. Each is counted under ``conflicts``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from typing import Any

from training.data_sources import Exchange, Feedback, SourceBatch

POSITIVE, NEGATIVE = 4, 2
"""A rating is positive at score >= 4 and negative at score <= 2."""

SFT_SOURCES = ("edit", "curated", "rating")
DPO_SOURCES = ("edit", "preference_text", "preference", "rating_pair")
KTO_SOURCES = ("rating",)


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, punctuation to spaces, whitespace collapsed: the key dedup compares."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w<>]+", " ", text).split())


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The normalized prompt: every turn's role and normalized content."""
    return "\n".join(f"{m['role']}: {normalize_text(m['content'])}" for m in messages)


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _sft(ex: Exchange, target: str, feedback_ids: list[str], source: str) -> dict[str, Any]:
    return {
        "prompt": ex.prompt,
        "completion": _assistant(target),
        "request_ids": [ex.id],
        "feedback_ids": feedback_ids,
        "source": source,
    }


def _dpo(
    prompt: list[dict[str, str]],
    chosen: str,
    rejected: str,
    request_ids: list[str],
    feedback_ids: list[str],
    source: str,
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": _assistant(chosen),
        "rejected": _assistant(rejected),
        "request_ids": request_ids,
        "feedback_ids": feedback_ids,
        "source": source,
    }


def _kto(ex: Exchange, good: bool, feedback_ids: list[str]) -> dict[str, Any]:
    return {
        "prompt": ex.prompt,
        "completion": _assistant(ex.response),
        "label": good,
        "request_ids": [ex.id],
        "feedback_ids": feedback_ids,
        "source": "rating",
    }


def build_rows(
    batch: SourceBatch, max_rating_pairs: int = 2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Turn exchanges + feedback into SFT rows, DPO pairs and unpaired (KTO) rows.

    Args:
        batch: what the sources read.
        max_rating_pairs: at most this many positive-vs-negative pairs per normalized prompt.

    Returns:
        (sft rows, dpo rows, kto rows, stats) where stats counts unusable feedback and conflicts.
    """
    ex = batch.exchanges
    unusable: Counter[str] = Counter()
    conflicts: Counter[str] = Counter()
    ratings: dict[str, list[Feedback]] = defaultdict(list)
    edits: dict[str, list[Feedback]] = defaultdict(list)
    prefs: list[Feedback] = []
    for fb in batch.feedback:
        target = ex.get(fb.request_id)
        if target is None:
            unusable["request not found (or filtered out)"] += 1
        elif target.status != "ok" or not target.response.strip():
            unusable[f"request status {target.status!r} or empty answer"] += 1
        elif not target.prompt or target.prompt[-1]["role"] != "user":
            unusable["request prompt does not end with a user message"] += 1
        elif fb.kind == "rating":
            ratings[fb.request_id].append(fb)
        elif fb.kind == "edit":
            edits[fb.request_id].append(fb)
        else:
            prefs.append(fb)

    sft: list[dict[str, Any]] = []
    dpo: list[dict[str, Any]] = []

    # Edits: the latest edit of an answer wins.
    for rid, fbs in edits.items():
        if len(fbs) > 1:
            conflicts["superseded_edits"] += len(fbs) - 1
        last = fbs[-1]
        text = last.payload["text"].strip()
        sft.append(_sft(ex[rid], text, [last.id], "edit"))
        if normalize_text(text) == normalize_text(ex[rid].response):
            unusable["edit identical to the answer (no pair)"] += 1
        else:
            dpo.append(_dpo(ex[rid].prompt, text, ex[rid].response, [rid], [last.id], "edit"))

    # Ratings: label each answer positive / negative unless it has both.
    label: dict[str, tuple[str, list[str]]] = {}
    for rid, fbs in ratings.items():
        pos = [f for f in fbs if f.payload["score"] >= POSITIVE]
        neg = [f for f in fbs if f.payload["score"] <= NEGATIVE]
        if pos and neg:
            conflicts["ratings_positive_and_negative"] += 1
        elif pos:
            label[rid] = ("pos", [f.id for f in pos])
        elif neg:
            label[rid] = ("neg", [f.id for f in neg])
    for rid, (lab, fids) in label.items():
        if lab != "pos":
            continue
        if rid in edits:
            conflicts["edited_and_rated_positive"] += 1
            continue
        sft.append(_sft(ex[rid], ex[rid].response, fids, "rating"))
    # Unpaired labels: the edit already says a positively rated answer was not what the user wanted.
    kto = [
        _kto(ex[rid], lab == "pos", fids)
        for rid, (lab, fids) in label.items()
        if not (lab == "pos" and rid in edits)
    ]
    for rid in sorted(batch.curated):
        if rid in ex:
            sft.append(_sft(ex[rid], ex[rid].response, [], "curated"))

    # Positive vs negative answers to the same normalized prompt.
    by_prompt: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"pos": [], "neg": []})
    for rid, (lab, _) in label.items():
        by_prompt[prompt_key(ex[rid].prompt)][lab].append(rid)
    for group in by_prompt.values():
        made = 0
        for p in group["pos"]:
            for n in group["neg"]:
                if made >= max_rating_pairs:
                    break
                if normalize_text(ex[p].response) == normalize_text(ex[n].response):
                    unusable["rated pair with identical answers"] += 1
                    continue
                dpo.append(
                    _dpo(
                        ex[p].prompt,
                        ex[p].response,
                        ex[n].response,
                        [p, n],
                        label[p][1] + label[n][1],
                        "rating_pair",
                    )
                )
                made += 1

    dpo += _preference_pairs(ex, prefs, unusable, conflicts)
    stats = {
        "feedback_unusable": dict(unusable),
        "conflicts": dict(conflicts),
        "built_sft": dict(Counter(r["source"] for r in sft)),
        "built_dpo": dict(Counter(r["source"] for r in dpo)),
        "built_kto": dict(Counter("desirable" if r["label"] else "undesirable" for r in kto)),
    }
    return sft, dpo, kto, stats


def _preference_pairs(
    ex: dict[str, Exchange], prefs: list[Feedback], unusable: Counter, conflicts: Counter
) -> list[dict[str, Any]]:
    """Pairs from explicit preferences; disagreeing preferences on the same two answers cancel."""
    rows: list[dict[str, Any]] = []
    votes: dict[frozenset[str], dict[str, list[str]]] = {}
    for fb in prefs:
        this = ex[fb.request_id]
        if "better_text" in fb.payload:
            better = fb.payload["better_text"].strip()
            if normalize_text(better) == normalize_text(this.response):
                unusable["better_text identical to the answer"] += 1
                continue
            rows.append(
                _dpo(this.prompt, better, this.response, [this.id], [fb.id], "preference_text")
            )
            continue
        other = ex.get(fb.payload["other_request_id"])
        if other is None or other.status != "ok" or not other.response.strip():
            unusable["preference: other request not found, filtered out or failed"] += 1
            continue
        if prompt_key(other.prompt) != prompt_key(this.prompt):
            unusable["preference: the two requests have different prompts"] += 1
            continue
        winner = this.id if fb.payload["preferred"] == "this" else other.id
        votes.setdefault(frozenset((this.id, other.id)), {}).setdefault(winner, []).append(fb.id)
    for pair, by_winner in votes.items():
        if len(pair) < 2:
            unusable["preference of an answer over itself"] += 1
            continue
        if len(by_winner) > 1:
            conflicts["preferences_disagree"] += 1
            continue
        ((winner, fids),) = by_winner.items()
        loser = next(iter(pair - {winner}))
        if normalize_text(ex[winner].response) == normalize_text(ex[loser].response):
            unusable["preference between identical answers"] += 1
            continue
        rows.append(
            _dpo(
                ex[winner].prompt,
                ex[winner].response,
                ex[loser].response,
                [winner, loser],
                fids,
                "preference",
            )
        )
    return rows
