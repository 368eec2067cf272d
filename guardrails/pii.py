"""PII detection and redaction with Presidio's pattern recognizers (offline, no NLP model).

No spaCy model is installable here, so we skip Presidio's ``AnalyzerEngine`` (which insists on an
NLP engine) and call the predefined *pattern* recognizers directly with ``nlp_artifacts=None``.
They carry their own validators (Luhn for credit cards, IBAN checksums, SSN invalid-range rules,
libphonenumber for phones). Replacement goes through presidio-anonymizer, which also resolves
overlapping spans.

    >>> default_detector().redact("mail me: jane@example.com")
    ('mail me: <EMAIL_ADDRESS>', ['EMAIL_ADDRESS'])
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_SSN",
    "CRYPTO",
)

# Every value of these types contains a digit, '@' (emails) or ':' (IPv6): text without any of
# them is skipped without running the recognizers (most chat text; ~0.4 ms saved per call).
_PREFILTER_ENTITIES = frozenset(DEFAULT_ENTITIES)
_MAYBE_PII = re.compile(r"[0-9@:]")

# Longest supported PII value we expect (IBANs with spaces are <= 42 chars, emails can be longer);
# a streaming filter holds back this many characters so a value never straddles an emitted chunk.
MAX_PII_CHARS = 96


@dataclass(frozen=True)
class PIISpan:
    """One PII finding: ``text[start:end]`` is a value of type ``entity`` with confidence ``score``."""

    entity: str
    start: int
    end: int
    score: float


def import_presidio_for_serving() -> None:
    """Import Presidio's pattern recognizers with torch and transformers hidden.

    presidio-analyzer 2.2.366 imports its NLP engines from the package ``__init__``, and those
    import transformers (and so torch) when they are installed, as they are in the pipeline env:
    measured ~5 s and ~450 MB per process (582 MB -> 130 MB RSS without them), for engines the
    pattern recognizers never use (Presidio treats both as optional: ImportError is handled).
    Only for processes that serve and never train (gateway workers, ``alignloop serve``), called
    before any other thread starts: while hidden, nothing else in the process can import them.
    """
    hidden = [m for m in ("torch", "transformers") if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        # lazy: presidio_analyzer, loads spaCy
        import presidio_analyzer.predefined_recognizers  # noqa: F401

        # lazy: presidio_anonymizer, Presidio
        import presidio_anonymizer  # noqa: F401
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def _offline_tldextract() -> None:
    """Make tldextract (used by Presidio's email validator) read its bundled suffix snapshot.

    Its default extractor fetches the public suffix list over the network on first use, which
    hangs or logs tracebacks on offline machines.
    """
    # lazy: tldextract, Presidio's e-mail validator only
    import tldextract.tldextract as tld

    if tld.TLD_EXTRACTOR.suffix_list_urls:
        tld.TLD_EXTRACTOR = tld.TLDExtract(
            suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True
        )


def _recognizers(entities: Sequence[str]) -> list:
    # lazy: presidio_analyzer, loads spaCy
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    by_entity = {
        "EMAIL_ADDRESS": EmailRecognizer,
        "PHONE_NUMBER": PhoneRecognizer,
        "CREDIT_CARD": CreditCardRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "IP_ADDRESS": IpRecognizer,
        "US_SSN": UsSsnRecognizer,
        "CRYPTO": CryptoRecognizer,
    }
    unknown = sorted(set(entities) - set(by_entity))
    if unknown:
        raise ValueError(f"pii entities: unsupported {unknown}; allowed: {sorted(by_entity)}")
    return [by_entity[e]() for e in dict.fromkeys(entities)]


class PIIDetector:
    """Finds and redacts PII with Presidio pattern recognizers.

    Args:
        entities: Presidio entity types to detect (see ``DEFAULT_ENTITIES``).
        min_score: findings below this confidence are ignored (phones without context score 0.4).
    """

    def __init__(self, entities: Sequence[str] = DEFAULT_ENTITIES, min_score: float = 0.3) -> None:
        # lazy: presidio_anonymizer, Presidio
        from presidio_anonymizer import AnonymizerEngine

        _offline_tldextract()
        self.entities = tuple(entities)
        self.min_score = min_score
        self._recognizers = _recognizers(self.entities)
        self._prefilter = set(self.entities) <= _PREFILTER_ENTITIES
        self.prefilterable = self._prefilter  # values always contain [0-9@:] (streaming uses it)
        self._anonymizer = AnonymizerEngine()
        # Recognizers load lazy data (libphonenumber metadata) on first use: pay it now, not in
        # the first request (~0.6 s).
        self.redact("warm-up: +1 415-555-0132, jane@example.com, 4111 1111 1111 1111")

    def _results(self, text: str) -> list:
        if self._prefilter and not _MAYBE_PII.search(text):
            return []
        out = []
        for rec in self._recognizers:
            for r in rec.analyze(text, rec.supported_entities, None) or []:
                if r.score >= self.min_score:
                    out.append(r)
        return out

    def find(self, text: str) -> list[PIISpan]:
        """All PII findings in ``text``, sorted by start (overlaps are kept)."""
        if not text:
            return []
        spans = [
            PIISpan(r.entity_type, r.start, r.end, float(r.score)) for r in self._results(text)
        ]
        return sorted(spans, key=lambda s: (s.start, -s.end))

    def redact(self, text: str) -> tuple[str, list[str]]:
        """Replace each PII value with ``<ENTITY_TYPE>``.

        Returns:
            The redacted text and the entity type of each replaced span (empty when nothing
            was found).
        """
        found: list[str] = []
        # A second pass catches values a neighbour hid: Presidio's card regex grabs
        # "4399 4111 1111 1111 1111" after an SSN, fails Luhn and misses the card behind it.
        for _ in range(3):
            text, types = self._redact_once(text)
            if not types:
                break
            found += types
        return text, found

    def _redact_once(self, text: str) -> tuple[str, list[str]]:
        if not text:
            return text, []
        results = self._results(text)
        if not results:
            return text, []
        # lazy: presidio_anonymizer, Presidio
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        conv = [RecognizerResult(e, a, b, sc) for e, a, b, sc in _merge_overlaps(results)]
        anon = self._anonymizer.anonymize(
            text=text,
            analyzer_results=conv,
            operators={"DEFAULT": OperatorConfig("replace", {})},  # -> "<ENTITY_TYPE>"
        )
        items = sorted(anon.items, key=lambda i: i.start)
        return anon.text, [i.entity_type for i in items]


def _merge_overlaps(results: list) -> list[tuple[str, int, int, float]]:
    """Union overlapping findings into one span typed by its highest-scoring finding.

    The anonymizer's own conflict resolution drops the lower-scored of two overlapping findings,
    which can leave part of a value in clear text (a phone match across an SSN and a card number
    dropped the card); a union never leaves a detected character behind.
    """
    merged: list[list] = []
    for r in sorted(results, key=lambda r: (r.start, -r.end)):
        if merged and r.start < merged[-1][2]:
            m = merged[-1]
            m[2] = max(m[2], r.end)
            if r.score > m[3]:
                m[0], m[3] = r.entity_type, r.score
        else:
            merged.append([r.entity_type, r.start, r.end, r.score])
    return [tuple(m) for m in merged]


@functools.lru_cache(maxsize=1)
def default_detector() -> PIIDetector:
    """A shared detector for ``DEFAULT_ENTITIES`` (building recognizers costs ~0.5 s)."""
    return PIIDetector()
