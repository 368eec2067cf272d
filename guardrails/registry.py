"""Hook names usable in ``configs/gateway.yaml`` -> factories. Any other hook: ``module:Factory``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from guardrails.base import InputHook, OutputHook
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


def build_hook(name: str, params: dict[str, Any]) -> InputHook | OutputHook:
    """A hook from a registered name or a ``package.module:Factory`` import path."""
    if name in HOOKS:
        factory: Callable[..., Any] = HOOKS[name]
    elif ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"guardrail hook {name!r}: cannot import ({e})") from None
    else:
        raise ValueError(
            f"guardrail hook {name!r}: unknown; registered: {sorted(HOOKS)} or 'module:Factory'"
        )
    try:
        return factory(**params)
    except TypeError as e:
        raise ValueError(f"guardrail hook {name!r}: bad params {params} ({e})") from None
