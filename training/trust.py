"""Which feedback may steer the shared model: trust rules of the data stage, over feedback events.

Any tenant key can send feedback, and an edit is text that becomes a training target. Without
rules, one tenant, or one user of a tenant, can write the model's answers. The rules, applied
before rows are built (``training/data.py``) and recorded in the dataset manifest:

1. **Participation is explicit per tenant.** Only the tenants listed in ``trust.tenants`` have
   their served answers and feedback read from the log store; the others are dropped and counted.
2. **Text targets need trust.** An edit (or a preference's ``better_text``) becomes a target when
   its author has a trusted role (``reviewer`` by default; ``simulated`` only where the server
   flagged a tenant so) or when ``min_agreeing_users`` distinct users gave the same text (after
   normalization) for the same prompt. Ratings and preferences between served answers carry no
   text of their own and need no agreement.
3. **No one dominates.** A capped actor (role ``user`` by default) contributes at most
   ``max_actor_share`` of the feedback events used (at least one); the earliest are kept.

Who an actor is comes from the server, never from the feedback body: the end user the answer was
served to (the chat request's OpenAI ``user`` field), within its tenant, and a role the server set
(``user``, ``reviewer`` from the review page, ``simulated`` from a tenant flagged in the gateway
config). Feedback without a user id counts as one actor per tenant ("<tenant>/anonymous"), so a
tenant that sends no user ids is capped as a single user. Feedback read from JSONL files the
operator listed counts as reviewed (``trust_jsonl``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from training.config import StrictModel
from training.data_sources import Feedback, SourceBatch
from training.preferences import normalize_text, prompt_key

Role = Literal["user", "reviewer", "simulated"]


class TrustConfig(StrictModel):
    """Trust rules of the data stage (docs/SECURITY.md, "Feedback and training data")."""

    tenants: list[str] = Field(
        default_factory=list,
        description="Tenants whose served answers and feedback may train the model; every other "
        "tenant's are dropped. Empty = none: participation is opt-in, per tenant.",
    )
    trusted_roles: list[Role] = Field(
        default_factory=lambda: ["reviewer"],
        description="Roles whose edits (and better_text) become targets on their own.",
    )
    min_agreeing_users: int = Field(
        2, ge=1,
        description="Otherwise an edit becomes a target when this many distinct users gave the "
        "same text for the same prompt (1 = any user's edit: trusting every user).",
    )
    max_actor_share: float = Field(
        0.25, gt=0, le=1,
        description="Largest share of the feedback events used that one capped actor may give.",
    )
    capped_roles: list[Role] = Field(
        default_factory=lambda: ["user"], description="Roles the share cap applies to."
    )
    trust_jsonl: bool = Field(
        True, description="Feedback in the configured JSONL files counts as reviewed."
    )


def actor_key(fb: Feedback) -> str:
    """Who gave ``fb``, as the rules count people: ``<tenant>/<user id or 'anonymous'>``."""
    return f"{fb.tenant}/{fb.actor or 'anonymous'}"


def _role(fb: Feedback, batch: SourceBatch, cfg: TrustConfig) -> str:
    ex = batch.exchanges.get(fb.request_id)
    if cfg.trust_jsonl and ex is not None and ex.source == "jsonl":
        return "reviewer"
    return fb.actor_role


def select_participants(batch: SourceBatch, tenants: list[str]) -> tuple[SourceBatch, dict[str, int]]:
    """The batch without log-store exchanges and feedback of tenants that do not participate."""
    allowed = set(tenants)
    dropped: Counter[str] = Counter()
    exchanges = {}
    for rid, ex in batch.exchanges.items():
        if ex.source == "logstore" and ex.tenant not in allowed:
            dropped[ex.tenant] += 0  # named even if it has no feedback
            continue
        exchanges[rid] = ex
    feedback = []
    for fb in batch.feedback:
        ex = batch.exchanges.get(fb.request_id)
        from_log = ex is None or ex.source == "logstore"
        if from_log and fb.tenant not in allowed:
            dropped[fb.tenant] += 1
            continue
        feedback.append(fb)
    return replace(batch, exchanges=exchanges, feedback=feedback), dict(dropped)


def _target_text(fb: Feedback) -> str | None:
    if fb.kind == "edit":
        return fb.payload.get("text")
    if fb.kind == "preference":
        return fb.payload.get("better_text")
    return None


def trusted_targets(batch: SourceBatch, cfg: TrustConfig) -> tuple[list[Feedback], Counter[str]]:
    """Feedback without untrusted text targets (see rule 2); returns (kept, dropped by reason)."""
    agree: dict[tuple[str, str], set[str]] = defaultdict(set)
    for fb in batch.feedback:
        text, ex = _target_text(fb), batch.exchanges.get(fb.request_id)
        if text is not None and ex is not None:
            agree[(prompt_key(ex.prompt), normalize_text(text))].add(actor_key(fb))
    kept, dropped = [], Counter()
    for fb in batch.feedback:
        text, ex = _target_text(fb), batch.exchanges.get(fb.request_id)
        if text is None or ex is None or _role(fb, batch, cfg) in cfg.trusted_roles:
            kept.append(fb)
            continue
        n = len(agree[(prompt_key(ex.prompt), normalize_text(text))])
        if n >= cfg.min_agreeing_users:
            kept.append(fb)
        else:
            dropped[f"{fb.kind} text from a {fb.actor_role} not confirmed "
                    f"({n} of {cfg.min_agreeing_users} users agree, no reviewer)"] += 1
    return kept, dropped


def cap_per_actor(
    feedback: list[Feedback], batch: SourceBatch, cfg: TrustConfig
) -> tuple[list[Feedback], dict[str, int], int]:
    """At most ``max_actor_share`` of the events per capped actor; returns (kept, dropped, cap).

    The cap k is the largest count with k <= share x (events kept with k), at least 1.
    """
    counts = Counter(actor_key(f) for f in feedback if _role(f, batch, cfg) in cfg.capped_roles)
    uncapped = len(feedback) - sum(counts.values())
    cap = 1
    for k in range(max(counts.values(), default=1), 0, -1):
        if k <= cfg.max_actor_share * (uncapped + sum(min(n, k) for n in counts.values())):
            cap = k
            break
    used: Counter[str] = Counter()
    kept, dropped = [], Counter()
    for fb in feedback:
        if _role(fb, batch, cfg) in cfg.capped_roles:
            who = actor_key(fb)
            if used[who] >= cap:
                dropped[who] += 1
                continue
            used[who] += 1
        kept.append(fb)
    return kept, dict(dropped), cap


def apply_trust(batch: SourceBatch, cfg: TrustConfig) -> tuple[SourceBatch, dict[str, Any]]:
    """The batch the rows are built from, and what each rule did (for the manifest)."""
    total = len(batch.feedback)
    batch, dropped_tenants = select_participants(batch, cfg.tenants)
    after_tenants = len(batch.feedback)
    kept, untrusted = trusted_targets(batch, cfg)
    kept, capped, cap = cap_per_actor(kept, batch, cfg)
    roles = Counter(_role(f, batch, cfg) for f in kept)
    actors = Counter(actor_key(f) for f in kept)
    top = actors.most_common(1)
    report = {
        "rules": cfg.model_dump(mode="json"),
        "feedback_in": total,
        "feedback_used": len(kept),
        "dropped_non_participating_tenants": dropped_tenants,
        "dropped_untrusted_text": dict(untrusted),
        "dropped_over_actor_cap": capped,
        "actor_cap_events": cap,
        "by_role": dict(roles),
        "actors": len(actors),
        "largest_actor_share": round(top[0][1] / len(kept), 4) if kept else 0.0,
        "steps": [
            {"step": "participating tenants", "feedback": after_tenants},
            {"step": "trusted text targets", "feedback": after_tenants - sum(untrusted.values())},
            {"step": "actor cap", "feedback": len(kept)},
        ],
    }
    return replace(batch, feedback=kept), report
