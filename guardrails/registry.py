"""Hook names usable in ``configs/gateway.yaml`` -> factories. Any other hook: ``module:Factory``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardrails.hooks import (
    BlockedPhrasesOutput,
    BlockedTopics,
    InjectionHeuristics,
    PIIOutput,
    PIIRedactInput,
    SizeLimits,
)

HOOKS: dict[str, Callable[..., Any]] = {
    "pii": PIIRedactInput,
    "injection": InjectionHeuristics,
    "blocked_topics": BlockedTopics,
    "size_limits": SizeLimits,
    "pii_output": PIIOutput,
    "blocked_phrases_output": BlockedPhrasesOutput,
}
