"""Demo traffic and simulated users for the embedded default (which has no real users).

The traffic generator sends the prompt pool (training/demo/prompts.jsonl) through any
OpenAI-compatible gateway with the ``openai`` client, two sampled answers for some prompts so
that preferences exist. Simulated users then judge each answer with their own rough idea of a
good answer (:func:`user_judgement`: looser limits, different phrases, noise), *not* with the
gate's policy scorer (evals/policy.py), so the policy metric does not grade the very function that
labelled the training data; they send ratings, preferences and edits to ``POST /v1/feedback`` with
httpx, exactly as real clients would. An edit is the pool item's policy-compliant reference answer,
so SFT learns the policy. That the feedback is simulated is recorded by the server, not by this
client: the gateway config flags the tenant (``simulated: true``), the gateway stores each event
with actor_role "simulated", and this generator stops if the gateway says otherwise (a key of a
tenant that is not flagged would pass simulated users off as real ones). Each request carries a
simulated user id (OpenAI's ``user``), which the trust rules of the data stage count.

Deterministic with a seed: the plan (order, which prompts get two samples, the sampling seed of
each request) and each user's decisions come from seeded generators keyed by the prompt, so
concurrency does not change them; vLLM samples with the per-request seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field

from evals.policy import compliance, match_faq
from ground.config import StrictModel, data_dir
from serving.control.server import running_server

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[1] / "training" / "demo"
DEFAULT_POOL = DEMO_DIR / "prompts.jsonl"
SIMULATED_COMMENT = "simulated user"


class SimulateConfig(StrictModel):
    """Config of the demo traffic generator and simulated users (`alignloop data simulate`)."""

    base_url: str | None = Field(
        None,
        description="The gateway's OpenAI base URL (ends in /v1); default: the running gateway's (server.json).",
    )
    api_key: str | None = Field(
        None, description="Tenant API key; default: the env var named by api_key_env."
    )
    api_key_env: str = Field("ALIGNLOOP_API_KEY", description="Env var holding the tenant API key.")
    model: str = Field(
        "alignloop", description="Model name sent in requests (the gateway maps it)."
    )
    pool: str | None = Field(
        None,
        description="Prompt pool JSONL (id, prompt, category, reference); default the bundled one.",
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N pool items of each round (tests)."
    )
    rounds: int = Field(1, ge=1, description="Passes over the pool.")
    seed: int = Field(0, description="Seed of the plan, the sampling and the users' decisions.")
    two_sample_fraction: float = Field(
        0.35, ge=0, le=1, description="Share of prompts answered twice (for preferences)."
    )
    max_tokens: int = Field(64, ge=1, description="Answer length cap (keeps demo training short).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of the answers.")
    noise: float = Field(
        0.1, ge=0, le=0.5, description="Probability that a simulated user flips a judgment."
    )
    edit_probability: float = Field(
        0.7,
        ge=0,
        le=1,
        description="Probability that a user edits a bad answer (else thumbs down).",
    )
    concurrency: int = Field(4, ge=1, description="Prompts in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="HTTP timeout per request.")
    out: str | None = Field(
        None, description="Traffic log JSONL; default <data dir>/simulate/traffic-<seed>.jsonl."
    )


@dataclass
class PlannedRequest:
    """One pool item to send, with one sampling seed per answer wanted."""

    index: int
    round: int
    item: dict[str, Any]
    sample_seeds: list[int]


@dataclass
class FeedbackAction:
    """One feedback call: the answer it is about (by sample index) and the API body."""

    sample: int
    body: dict[str, Any]  # request_id is filled in when sent


@dataclass
class SimulateResult:
    """What the generator sent."""

    requests: int
    failed: int
    feedback: dict[str, int]
    mean_compliance: float
    traffic_path: str
    seconds: float
    errors: list[str] = field(default_factory=list)


def load_pool(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The prompt pool; each item needs id, prompt, category and a compliant reference answer.

    Raises:
        ValueError: naming the file, line and missing field.
    """
    path = Path(path) if path else DEFAULT_POOL
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        for key in ("id", "prompt", "category", "reference"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ValueError(
                    f"prompt pool {path} line {lineno}: field {key!r} missing or empty"
                )
        items.append(item)
    if not items:
        raise ValueError(f"prompt pool {path}: empty")
    return items


def plan_traffic(pool: list[dict[str, Any]], cfg: SimulateConfig) -> list[PlannedRequest]:
    """The requests to send: each round shuffles the pool; some prompts get two sampled answers."""
    rng = random.Random(cfg.seed)
    plan: list[PlannedRequest] = []
    for rnd in range(cfg.rounds):
        order = list(pool)
        rng.shuffle(order)
        for item in order[: cfg.limit]:
            n = 2 if rng.random() < cfg.two_sample_fraction else 1
            plan.append(
                PlannedRequest(len(plan), rnd, item, [rng.randrange(2**31) for _ in range(n)])
            )
    return plan


_USER_WORD_LIMIT = 60
_USER_GREETINGS = ("sure", "hello", "hi ", "hi,", "hey", "great question", "of course", "certainly")
_USER_REFERRAL = re.compile(r"\b(consult|see|ask|talk to|speak (?:to|with))\b.*\b(doctor|lawyer|attorney|"
                            r"advis[oe]r|professional|pharmacist|accountant)", re.IGNORECASE)
_DIGITS_OR_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|\d[\d -]{6,}\d")


def user_judgement(item: dict[str, Any], answer: str) -> float:
    """How satisfied a simulated user is with ``answer`` (0 to 1): the share of their checks met.

    A different scorer from the gate's :func:`evals.policy.compliance` on purpose: users want a
    short answer (at most 60 words, not the policy's 40 and its 20-word first sentence), no
    greeting, the FAQ fact when they asked about the product (words of the fact, any order), to be
    sent to a professional for advice (any wording, not the policy's fixed phrase), and never to
    see their own email or number repeated (a plain pattern, not the gateway's Presidio).
    """
    text = answer.strip()
    low = text.lower()
    words = text.split()
    checks = [0 < len(words) <= _USER_WORD_LIMIT, not low.startswith(_USER_GREETINGS)]
    category = item["category"]
    if category == "advice":
        checks.append(bool(_USER_REFERRAL.search(text)))
    if category == "personal_data":
        mine = {m.group(0).strip() for m in _DIGITS_OR_EMAIL.finditer(item["prompt"])}
        checks.append(not any(v in text for v in mine))
    if category in ("faq", "personal_data"):
        faq = match_faq(item["prompt"])
        if faq:
            checks.append(all(w.lower() in low for w in faq["fact"].split()))
    return sum(checks) / len(checks)


def decide_feedback(
    item: dict[str, Any], answers: list[str], cfg: SimulateConfig, rnd: int = 0
) -> tuple[list[FeedbackAction], list[float]]:
    """What a simulated user does with the answers to one prompt (pure, seeded by the prompt).

    Rules: an answer the user is fully satisfied with (:func:`user_judgement`) gets thumbs up,
    any other gets the pool's reference answer as an edit (probability ``edit_probability``) or
    thumbs down; of two answers the user rates differently the better one is preferred (the worse
    one is then judged as above); with probability ``noise`` a judgment is flipped.

    Returns:
        (feedback actions, the policy compliance of each answer as the gate's scorer measures it:
        reported in the traffic log, never used for the labels).
    """
    rng = random.Random(f"{cfg.seed}:{rnd}:{item['id']}")
    judged = [user_judgement(item, a) for a in answers]
    scores = [compliance(item["prompt"], a, item["category"]) for a in answers]
    comment = f"{SIMULATED_COMMENT} (seed={cfg.seed}, noise={cfg.noise})"
    actions: list[FeedbackAction] = []

    def judge(i: int) -> None:
        good = judged[i] >= 1.0
        if rng.random() < cfg.noise:
            good = not good
        if good:
            actions.append(FeedbackAction(i, {"rating": {"thumbs": "up"}, "comment": comment}))
        elif rng.random() < cfg.edit_probability:
            actions.append(
                FeedbackAction(i, {"edit": {"text": item["reference"]}, "comment": comment})
            )
        else:
            actions.append(FeedbackAction(i, {"rating": {"thumbs": "down"}, "comment": comment}))

    if len(answers) == 2 and judged[0] != judged[1]:
        better = 0 if judged[0] > judged[1] else 1
        if rng.random() < cfg.noise:
            better = 1 - better
        actions.append(
            FeedbackAction(
                0,
                {
                    "preference": {
                        "other_request_id": 1,
                        "preferred": "this" if better == 0 else "other",
                    },
                    "comment": comment,
                },
            )
        )
        judge(1 - better)
    else:
        for i in range(len(answers)):
            judge(i)
    return actions, scores


def resolve_base_url(cfg: SimulateConfig) -> str:
    """``cfg.base_url``, or the running gateway's URL + /v1 (from its server.json)."""
    if cfg.base_url:
        return cfg.base_url

    info = running_server()
    if info is None:
        raise ValueError(
            "base_url: not set and no running gateway found (start one with `alignloop serve`)"
        )
    return info["url"].rstrip("/") + "/v1"


class _Client:
    """The gateway over HTTP: chat via the openai SDK, feedback via httpx."""

    def __init__(self, cfg: SimulateConfig) -> None:
        # lazy: openai, about a second
        import openai

        key = cfg.api_key or os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"api_key: not set (and env var {cfg.api_key_env} is empty)")
        self.base_url = resolve_base_url(cfg)
        self.cfg = cfg
        self.chat = openai.OpenAI(
            base_url=self.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=2
        )
        self.http = httpx.Client(
            base_url=self.base_url.rstrip("/"),
            timeout=cfg.timeout_s,
            headers={"Authorization": f"Bearer {key}"},
        )

    def answer(self, prompt: str, seed: int, user: str) -> tuple[str, str]:
        r = self.chat.chat.completions.create(
            model=self.cfg.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.cfg.max_tokens,
            temperature=self.cfg.temperature,
            seed=seed,
            user=user,
        )
        return r.id, r.choices[0].message.content or ""

    def feedback(self, body: dict[str, Any]) -> None:
        resp = self.http.post("/feedback", json=body)
        if resp.status_code >= 400:
            raise RuntimeError(f"feedback {resp.status_code}: {resp.text[:300]}")
        role = resp.json().get("actor_role")
        if role != "simulated":
            raise SimulationLabelError(
                f"the gateway recorded this feedback as actor_role {role!r}, not 'simulated': "
                "flag the tenant of this API key `simulated: true` in the gateway config"
            )

    def close(self) -> None:
        self.http.close()
        self.chat.close()


class SimulationLabelError(RuntimeError):
    """The gateway does not record this tenant's feedback as simulated."""


def _run_one(client: _Client, req: PlannedRequest, cfg: SimulateConfig) -> dict[str, Any]:
    ids, answers = [], []
    user = f"simulated-user-{req.index % 16}"  # one of 16 simulated people
    for seed in req.sample_seeds:
        rid, text = client.answer(req.item["prompt"], seed, user)
        ids.append(rid)
        answers.append(text)
    actions, scores = decide_feedback(req.item, answers, cfg, req.round)
    sent = []
    for act in actions:
        body = json.loads(json.dumps(act.body))
        if "preference" in body:  # sample index -> the other answer's request id
            body["preference"]["other_request_id"] = ids[1]
        client.feedback({"request_id": ids[act.sample], **body})
        sent.append({"sample": act.sample, **act.body})
    return {
        "index": req.index,
        "round": req.round,
        "item": req.item["id"],
        "category": req.item["category"],
        "request_ids": ids,
        "answers": answers,
        "compliance": scores,
        "feedback": sent,
    }


def run(cfg: SimulateConfig) -> SimulateResult:
    """Send the planned traffic through the gateway and the simulated users' feedback.

    A prompt whose request fails is logged and counted in ``failed``; the run goes on.
    """
    start = time.monotonic()
    plan = plan_traffic(load_pool(cfg.pool), cfg)
    out = Path(cfg.out) if cfg.out else data_dir() / "simulate" / f"traffic-{cfg.seed}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    client = _Client(cfg)
    records: list[dict[str, Any] | None] = [None] * len(plan)
    errors: list[str] = []
    try:
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            futures = {pool.submit(_run_one, client, req, cfg): req for req in plan}
            for fut, req in futures.items():
                try:
                    records[req.index] = fut.result()
                except SimulationLabelError:
                    raise
                except Exception as err:  # noqa: BLE001 - one failed prompt must not stop the demo
                    errors.append(f"{req.item['id']}: {type(err).__name__}: {err}"[:300])
                    log.warning("simulate: %s failed: %s", req.item["id"], err)
    finally:
        client.close()
    done = [r for r in records if r is not None]
    if plan and not done:
        raise RuntimeError(
            f"simulate: every request to {client.base_url} failed; first: {errors[0]}"
        )
    with out.open("w") as f:
        for r in done:
            f.write(json.dumps(r) + "\n")
    kinds: dict[str, int] = {}
    for r in done:
        for fb in r["feedback"]:
            kind = next(k for k in ("rating", "preference", "edit") if k in fb)
            kinds[kind] = kinds.get(kind, 0) + 1
    scores = [s for r in done for s in r["compliance"]]
    result = SimulateResult(
        requests=sum(len(r["request_ids"]) for r in done),
        failed=len(errors),
        feedback=kinds,
        mean_compliance=round(sum(scores) / len(scores), 4) if scores else 0.0,
        traffic_path=str(out),
        seconds=round(time.monotonic() - start, 1),
        errors=errors[:20],
    )
    log.info("simulate: %s", asdict(result))
    return result
