"""Which feedback may steer the shared model: trust rules of the data stage, over feedback events.

Any tenant key can send feedback, and an edit is text that becomes a training target. Without
rules, one tenant, or one user of a tenant, can write the model's answers. The rules, applied
before rows are built (``training/data.py``) and recorded in the dataset manifest:

1. **Participation is explicit per tenant.** Only the tenants listed in ``trust.tenants`` have
   their served answers and feedback read from the log store; the others are dropped and counted.
2. **Text targets need trust.** An edit (or a preference's ``better_text``) becomes a target when
   its author has a trusted role (``reviewer`` by default; ``simulated`` only where the server
   flagged a tenant so) or when ``min_agreeing_users`` distinct users gave the same text (after
   normalization) for the same prompt. A user id is the tenant's word (its key may name any number
   of users), so one tenant vouches for at most ``max_agreeing_users_per_tenant`` of them (default
   1: agreement takes that many tenants). Ratings and preferences between served answers carry no
   text of their own and need no agreement.
3. **No one dominates.** A capped actor (role ``user`` by default) contributes at most
   ``max_actor_share`` of the feedback events used (at least one); the earliest are kept.
4. **No tenant dominates.** Minting user ids gets round rule 3, so the rows built from one
   tenant's log-store answers are at most ``max_tenant_share`` of each training set's log-store
   rows (:func:`cap_tenant_rows`, applied to each window's rows as they enter the ledger). With a
   single participating tenant there is no other to protect and the cap does not bind; rows from
   the operator's JSONL files are neither capped nor counted.

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

from ground.config import StrictModel
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
    max_agreeing_users_per_tenant: int = Field(
        1, ge=1,
        description="How many of the agreeing users one tenant can account for (its key can name "
        "any user id): 1 = min_agreeing_users distinct tenants must agree.",
    )
    capped_roles: list[Role] = Field(
        default_factory=lambda: ["user"], description="Roles the share cap applies to."
    )
    max_tenant_share: float = Field(
        0.5, gt=0, le=1,
        description="Largest share of a training set's log-store rows built from one tenant's "
        "answers (1 = no cap); binds when two or more tenants contribute.",
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
    # (prompt, text) -> tenant -> its user ids that gave the text
    agree: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for fb in batch.feedback:
        text, ex = _target_text(fb), batch.exchanges.get(fb.request_id)
        if text is not None and ex is not None:
            agree[(prompt_key(ex.prompt), normalize_text(text))][fb.tenant].add(actor_key(fb))
    kept, dropped = [], Counter()
    for fb in batch.feedback:
        text, ex = _target_text(fb), batch.exchanges.get(fb.request_id)
        if text is None or ex is None or _role(fb, batch, cfg) in cfg.trusted_roles:
            kept.append(fb)
            continue
        by_tenant = agree[(prompt_key(ex.prompt), normalize_text(text))]
        n = sum(min(len(users), cfg.max_agreeing_users_per_tenant) for users in by_tenant.values())
        if n >= cfg.min_agreeing_users:
            kept.append(fb)
        else:
            dropped[f"{fb.kind} text from a {fb.actor_role} not confirmed "
                    f"({n} of {cfg.min_agreeing_users} users agree, at most "
                    f"{cfg.max_agreeing_users_per_tenant} counted per tenant, no reviewer)"] += 1
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


def _share_cap(counts: Counter[str], share: float) -> int | None:
    """The largest k with k <= share x (rows kept when each count is cut to k); None: no cap
    (fewer than two contributors, or none over their share)."""
    if len(counts) < 2:
        return None
    for k in range(max(counts.values()), 0, -1):
        if k <= share * sum(min(n, k) for n in counts.values()):
            return None if k >= max(counts.values()) else k
    return 1


def cap_tenant_rows(
    rows: dict[str, list[dict[str, Any]]], batch: SourceBatch, share: float
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Rule 4: per training set, the rows of one tenant's log-store answers are at most ``share``
    of that set's log-store rows (the earliest built are kept). Returns (rows, manifest part with
    the rows dropped per set and tenant, and why)."""
    def tenant_of(row: dict[str, Any]) -> str | None:
        ex = next((batch.exchanges.get(r) for r in row["request_ids"] if r in batch.exchanges), None)
        return ex.tenant if ex is not None and ex.source == "logstore" else None

    out: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {"max_tenant_share": share, "cap_rows": {}, "dropped": {}}
    for kind, items in rows.items():
        tenants = [tenant_of(r) for r in items]
        cap = _share_cap(Counter(t for t in tenants if t is not None), share)
        used: Counter[str] = Counter()
        kept, dropped = [], Counter()
        for row, tenant in zip(items, tenants, strict=True):
            if tenant is not None and cap is not None:
                if used[tenant] >= cap:
                    dropped[tenant] += 1
                    continue
                used[tenant] += 1
            kept.append(row)
        out[kind] = kept
        report["cap_rows"][kind] = cap
        if dropped:
            report["dropped"][kind] = dict(dropped)
    if report["dropped"]:
        report["reason"] = (f"one tenant's rows over max_tenant_share ({share:g}) of a training "
                            "set's log-store rows")
    return out, report


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
