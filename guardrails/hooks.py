"""Built-in rule-based hooks (offline): PII, prompt injection / jailbreak, blocked topics, size limits."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ground.protocol import ChatCompletionRequest
from guardrails.base import InputHook, OutputHook, Verdict
from guardrails.pii import DEFAULT_ENTITIES, MAX_PII_CHARS, PIIDetector, default_detector

DEFAULT_INJECTION_PATTERNS: tuple[str, ...] = (
    r"\b(ignore|disregard|forget|override)\b.{0,40}\b(previous|prior|above|earlier|all|system)\b.{0,20}\b(instructions?|prompts?|rules|guidelines|directions)\b",
    r"\b(reveal|print|show|repeat|leak)\b.{0,30}\b(system prompt|hidden (instructions|prompt)|initial instructions)\b",
    r"\byou are now\b.{0,40}\b(DAN|unfiltered|jailbroken|unrestricted|evil)\b",
    r"\b(DAN|developer) mode\b",
    r"\bjailbreak(ed|ing)?\b",
    r"\b(pretend|act|roleplay)\b.{0,40}\b(no|without|free of)\b.{0,20}\b(restrictions|limits|filters|rules|guidelines)\b",
)


# A token that could begin a PII value (see PIIOutput.releasable).
_SUSPICIOUS_TOKEN = re.compile(r"[^\s]*[0-9@:+(][^\s]*")


def _compile(patterns: Sequence[str], field: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE | re.DOTALL))
        except re.error as e:
            raise ValueError(f"{field}: bad regex {p!r}: {e}") from None
    return out


def _detector(entities: Sequence[str] | None, min_score: float | None) -> PIIDetector:
    if entities is None and min_score is None:
        return default_detector()
    return PIIDetector(entities or DEFAULT_ENTITIES, 0.3 if min_score is None else min_score)


class PIIRedactInput(InputHook):
    """Replaces PII in every message's text with ``<ENTITY_TYPE>`` before the model sees it."""

    name = "pii"

    def __init__(self, entities: list[str] | None = None, min_score: float | None = None) -> None:
        self.detector = _detector(entities, min_score)

    def check(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Verdict]:
        found: list[str] = []

        def redact(text: str) -> str:
            new, types = self.detector.redact(text)
            found.extend(types)
            return new

        messages = [m.map_texts(redact) for m in request.messages]
        if not found:
            return request, self.verdict("allow")
        request = request.model_copy(update={"messages": messages})
        return request, self.verdict("redact", "redacted " + ",".join(sorted(set(found))))


class PIIOutput(OutputHook):
    """Finds PII in answers; ``mode='redact'`` replaces it, ``mode='block'`` refuses the answer."""

    name = "pii_output"

    def __init__(
        self,
        mode: str = "redact",
        entities: list[str] | None = None,
        min_score: float | None = None,
        holdback_chars: int = MAX_PII_CHARS,
    ) -> None:
        if mode not in ("redact", "block"):
            raise ValueError(f"pii_output.mode: {mode!r} not in ['redact', 'block']")
        self.mode = mode
        self.detector = _detector(entities, min_score)
        self.holdback_chars = holdback_chars

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.detector.find(text)]

    def releasable(self, text: str) -> int:
        """Release all but the tail that could still become (part of) a PII value.

        Every supported value starts with a whitespace-free token containing a digit, '@', ':',
        '+' or '(' (phones, cards, IBANs, SSNs, IPs, crypto addresses, emails), and emails hold no
        whitespace. So we hold back from the first such token within the last ``holdback_chars``
        (or from the last, unfinished token); text older than that window is the classic bound.
        Values crossing the cut are caught by ``OutputChain.safe_cut``.
        """
        classic = len(text) - self.holdback_chars
        if not self.detector.prefilterable:
            return classic
        window_start = max(0, classic)
        last_ws = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        cut = last_ws + 1  # the last token may still grow
        m = _SUSPICIOUS_TOKEN.search(text, window_start, cut)
        if m:
            cut = m.start()
        return max(cut, classic)

    def check(self, text: str) -> tuple[str, Verdict]:
        if self.mode == "block":
            found = self.detector.find(text)
            if found:
                return text, self.verdict(
                    "block", "answer contains " + ",".join(sorted({s.entity for s in found}))
                )
            return text, self.verdict("allow")
        new, types = self.detector.redact(text)
        if types:
            return new, self.verdict("redact", "redacted " + ",".join(sorted(set(types))))
        return text, self.verdict("allow")


class InjectionHeuristics(InputHook):
    """Blocks prompt-injection / jailbreak attempts matched by regex patterns (configurable)."""

    name = "injection"
    rewrites = False  # only looks: may run while the upstream call is on its way

    def __init__(
        self,
        patterns: list[str] | None = None,
        extra_patterns: list[str] | None = None,
        roles: list[str] | None = None,
    ) -> None:
        self.patterns = _compile(
            list(patterns or DEFAULT_INJECTION_PATTERNS) + list(extra_patterns or []),
            "injection.patterns",
        )
        self.roles = set(roles or ["user"])  # operators' system prompts are trusted

    def check(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Verdict]:
        for m in request.messages:
            if m.role not in self.roles:
                continue
            for text in m.texts():
                for p in self.patterns:
                    if p.search(text):
                        return request, self.verdict(
                            "block", f"injection pattern {p.pattern[:60]!r}"
                        )
        return request, self.verdict("allow")


class BlockedTopics(InputHook):
    """Blocks requests about configured topics (``{topic: [regex, ...]}``)."""

    name = "blocked_topics"
    rewrites = False  # only looks: may run while the upstream call is on its way

    def __init__(
        self, topics: dict[str, list[str]] | None = None, roles: list[str] | None = None
    ) -> None:
        self.topics = {
            t: _compile(ps, f"blocked_topics.topics.{t}") for t, ps in (topics or {}).items()
        }
        self.roles = set(roles or ["user"])

    def check(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Verdict]:
        for m in request.messages:
            if m.role not in self.roles:
                continue
            for text in m.texts():
                for topic, pats in self.topics.items():
                    if any(p.search(text) for p in pats):
                        return request, self.verdict("block", f"blocked topic {topic!r}")
        return request, self.verdict("allow")


class BlockedPhrasesOutput(OutputHook):
    """Blocks answers that contain configured phrases/patterns (policy phrases, topics)."""

    name = "blocked_phrases_output"

    def __init__(
        self, topics: dict[str, list[str]] | None = None, holdback_chars: int = 64
    ) -> None:
        self.topics = {
            t: _compile(ps, f"blocked_phrases_output.topics.{t}")
            for t, ps in (topics or {}).items()
        }
        self.holdback_chars = holdback_chars

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for pats in self.topics.values() for p in pats for m in p.finditer(text)]

    def check(self, text: str) -> tuple[str, Verdict]:
        for topic, pats in self.topics.items():
            if any(p.search(text) for p in pats):
                return text, self.verdict("block", f"answer on blocked topic {topic!r}")
        return text, self.verdict("allow")


class SizeLimits(InputHook):
    """Blocks requests over the configured size: total characters, messages, max_tokens."""

    name = "size_limits"
    rewrites = False  # only looks: may run while the upstream call is on its way

    def __init__(
        self, max_chars: int = 32_000, max_messages: int = 64, max_tokens: int = 4096
    ) -> None:
        self.max_chars, self.max_messages, self.max_tokens = max_chars, max_messages, max_tokens

    def check(self, request: ChatCompletionRequest) -> tuple[ChatCompletionRequest, Verdict]:
        if len(request.messages) > self.max_messages:
            return request, self.verdict(
                "block", f"{len(request.messages)} messages > {self.max_messages}"
            )
        chars = sum(len(t) for m in request.messages for t in m.texts())
        if chars > self.max_chars:
            return request, self.verdict("block", f"{chars} characters > {self.max_chars}")
        mt = request.requested_max_tokens()
        if mt is not None and mt > self.max_tokens:
            return request, self.verdict("block", f"max_tokens {mt} > {self.max_tokens}")
        return request, self.verdict("allow")
