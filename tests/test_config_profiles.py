"""Config profiles: a YAML that names its ``base`` and states only what differs.

The shipped GPU and demo variants are profiles: each loads through its own typed config, and
differs from its base in the keys it states and nowhere else, so a change to the base reaches
every variant. The merge itself (ground.config) is tested on small schemas: mappings merge key by
key, lists and scalars replace, chains work, a cycle fails naming the files, a bad key names the
file that states it, and command-line overrides apply last.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from flows.loop_config import load_loop_config
from ground.config import (
    PROFILE_BASE,
    PROFILE_UNSET,
    ConfigError,
    StrictModel,
    load_config,
    read_config_file,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_shipped_configs import REPO, SCHEMAS, _schema  # noqa: E402

# The shipped profiles and their bases; a variant that becomes a full copy again fails here.
SHIPPED_PROFILES = {
    "evals-gpu.yaml": "evals.yaml",
    "evals-demo.yaml": "evals.yaml",
    "loop-gpu.yaml": "loop.yaml",
    "serve-gpu.yaml": "serve.yaml",
}


def _own(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / name).read_text()) or {}


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf paths of a mapping (lists and empty mappings are leaves: they replace whole)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, (*prefix, key)))
    return out


def _stated_paths(name: str) -> list[tuple[str, ...]]:
    """The leaf paths a profile states itself, including the base keys it unsets."""
    own = _own(name)
    unset = [tuple(d.split(".")) for d in own.get(PROFILE_UNSET, [])]
    body = {k: v for k, v in own.items() if k not in (PROFILE_BASE, PROFILE_UNSET)}
    return [*_leaves(body), *unset]


def _resolved(name: str) -> dict[str, Any]:
    ref, wired = SCHEMAS[name]
    overrides = [f"{k}={v}" for k, v in wired.items()]
    return load_config(_schema(ref), REPO / "configs" / name, overrides).model_dump(mode="json")


def test_shipped_profiles_name_their_base() -> None:
    profiles = {p.name: _own(p.name)[PROFILE_BASE] for p in (REPO / "configs").glob("*.yaml")
                if PROFILE_BASE in _own(p.name)}
    assert profiles == SHIPPED_PROFILES


@pytest.mark.parametrize("name", sorted(SHIPPED_PROFILES))
def test_shipped_profile_loads_through_its_typed_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    base = SHIPPED_PROFILES[name]
    assert SCHEMAS[name][0] == SCHEMAS[base][0], f"{name}: a profile has its base's schema"
    cfg = load_config(_schema(SCHEMAS[name][0]), REPO / "configs" / name,
                      [f"{k}={v}" for k, v in SCHEMAS[name][1].items()])
    assert PROFILE_BASE not in cfg.model_dump()


@pytest.mark.parametrize("name", sorted(SHIPPED_PROFILES))
def test_shipped_profile_differs_from_its_base_only_where_it_says(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every leaf where the resolved profile and its resolved base differ is one the profile
    states (or unsets); and it restates no value its base file already holds."""
    monkeypatch.chdir(REPO)
    base, profile = _leaves(_resolved(SHIPPED_PROFILES[name])), _leaves(_resolved(name))
    differing = {p for p in base.keys() | profile.keys() if base.get(p, "<absent>") != profile.get(p, "<absent>")}
    stated = _stated_paths(name)
    unexplained = [p for p in differing
                   if not any(p[: len(s)] == s or s[: len(p)] == p for s in stated)]
    assert not unexplained, f"{name} differs from its base where it says nothing: {unexplained}"
    assert differing, f"{name} resolves to its base: drop it or say what differs"

    base_file = _leaves(read_config_file(REPO / "configs" / SHIPPED_PROFILES[name]))
    own = _leaves({k: v for k, v in _own(name).items() if k not in (PROFILE_BASE, PROFILE_UNSET)})
    restated = [p for p, v in own.items() if p in base_file and base_file[p] == v]
    assert not restated, f"{name} restates values its base file holds: {restated}"


# --- the merge, on a small schema ---------------------------------------------------------


class Lora(StrictModel):
    rank: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, description="LoRA alpha.")
    targets: list[str] = Field(default_factory=lambda: ["all-linear"], description="Modules.")


class Stage(StrictModel):
    name: str = Field("x", description="A name.")
    epochs: int = Field(1, description="Epochs.")
    lora: Lora = Field(default_factory=Lora, description="LoRA.")
    files: dict[str, str] = Field(default_factory=dict, description="Named files.")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = "name: base\nepochs: 3\nlora:\n  rank: 8\n  alpha: 16\n  targets: [q, k, v]\nfiles: {a: x, b: y}\n"


def test_profile_merges_mappings_and_replaces_lists_and_scalars(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    prof = write(tmp_path, "prof.yaml", "base: base.yaml\nepochs: 5\nlora:\n  rank: 4\n  targets: [o]\n")
    cfg = load_config(Stage, prof)
    assert (cfg.name, cfg.epochs) == ("base", 5)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (4, 16, ["o"])
    assert cfg.files == {"a": "x", "b": "y"}
    assert read_config_file(prof) == {"name": "base", "epochs": 5, "files": {"a": "x", "b": "y"},
                                      "lora": {"rank": 4, "alpha": 16, "targets": ["o"]}}


def test_a_plain_file_reads_as_itself(tmp_path: Path) -> None:
    path = write(tmp_path, "base.yaml", BASE)
    assert read_config_file(path) == yaml.safe_load(BASE)


def test_base_is_found_from_the_profiles_folder_and_chains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "common/base.yaml", BASE)
    write(tmp_path, "common/mid.yaml", "base: base.yaml\nlora:\n  alpha: 64\n")
    top = write(tmp_path, "variants/top.yaml", "base: ../common/mid.yaml\nname: top\n")
    monkeypatch.chdir(tmp_path / "variants")
    cfg = load_config(Stage, "top.yaml")
    assert (cfg.name, cfg.epochs, cfg.lora.rank, cfg.lora.alpha) == ("top", 3, 8, 64)
    assert load_config(Stage, top) == cfg


def test_unset_drops_a_key_of_the_base(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    prof = write(tmp_path, "prof.yaml", "base: base.yaml\nunset: [files.b, epochs]\n")
    cfg = load_config(Stage, prof)
    assert (cfg.files, cfg.epochs) == ({"a": "x"}, 1)


@pytest.mark.parametrize(("text", "expect"), [
    ("base: base.yaml\nunset: [files.c]\n", r"prof\.yaml: unset 'files\.c' is not a key of .*base\.yaml"),
    ("base: base.yaml\nunset: files.a\n", r"prof\.yaml: 'unset' must be a list"),
    ("unset: [files.a]\n", r"prof\.yaml: 'unset' needs a 'base'"),
    ("base: missing.yaml\n", r"prof\.yaml: base file not found: .*missing\.yaml"),
    ("base: [base.yaml]\n", r"prof\.yaml: 'base' must name a YAML file"),
])
def test_bad_profile_keys_name_the_file(tmp_path: Path, text: str, expect: str) -> None:
    write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ConfigError, match=expect):
        load_config(Stage, write(tmp_path, "prof.yaml", text))


def test_unknown_key_in_a_profile_names_the_key_and_the_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    prof = write(tmp_path, "prof.yaml", "base: base.yaml\nlora:\n  rnak: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(Stage, prof)
    msg = str(err.value)
    assert f"invalid config {prof} over {base}:" in msg
    assert f"  lora.rnak: unknown key (not a field of this config) (stated in {prof})" in msg


def test_bad_value_in_the_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE.replace("rank: 8", "rank: -1"))
    prof = write(tmp_path, "prof.yaml", "base: base.yaml\nname: p\n")
    with pytest.raises(ConfigError, match=rf"  lora\.rank: .*greater than 0.*\(stated in {re.escape(str(base))}\)"):
        load_config(Stage, prof)


def test_a_cycle_fails_naming_the_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "base: b.yaml\nname: a\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=re.escape(f"config base cycle: {a} -> {b} -> {a}")):
        load_config(Stage, a)
    own = write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="config base cycle"):
        read_config_file(own)


def test_overrides_apply_after_the_merge(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    prof = write(tmp_path, "prof.yaml", "base: base.yaml\nepochs: 5\nlora:\n  rank: 4\n")
    cfg = load_config(Stage, prof, ["lora.rank=2", "lora.targets=[x]", "files.c=z"])
    assert (cfg.epochs, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (5, 2, 16, ["x"])
    assert cfg.files == {"a": "x", "b": "y", "c": "z"}
    with pytest.raises(ConfigError, match=r"  lora\.rank: .*\(stated in overrides\)"):
        load_config(Stage, prof, ["lora.rank=abc"])


def test_a_loop_stage_file_may_be_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads its stage files through the same reader, so a stage YAML may be a profile."""
    monkeypatch.chdir(REPO)
    sft = write(tmp_path, "sft-long.yaml", f"base: {REPO / 'configs' / 'sft.yaml'}\ntrain:\n  max_length: 512\n")
    cfg = load_loop_config(REPO / "configs" / "loop.yaml", [f"stage_files.sft={sft}"])
    section = cfg.section("sft")
    assert section["train"]["max_length"] == 512
    assert section["lora"] == read_config_file(REPO / "configs" / "sft.yaml")["lora"]
