"""Config loading: good files load; unknown keys, wrong types and bad enum values name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from ground.config import ConfigError, StrictModel, load_config, parse_overrides


class Lora(StrictModel):
    rank: int = Field(16, gt=0, description="LoRA rank.")
    targets: list[str] = Field(default_factory=lambda: ["all-linear"], description="Modules.")


class Stage(StrictModel):
    name: str = Field("x", description="A name.")
    scheme: Literal["w4a16", "w8a8-int8"] = Field("w4a16", description="Scheme.")
    lora: Lora = Field(default_factory=Lora, description="LoRA.")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_good_file_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(Stage, write(tmp_path, "name: a\nlora:\n  rank: 4\n"), ["lora.rank=8", "scheme=w8a8-int8"])
    assert (cfg.name, cfg.lora.rank, cfg.scheme) == ("a", 8, "w8a8-int8")
    assert cfg.lora.targets == ["all-linear"]


@pytest.mark.parametrize(
    ("text", "field", "expect"),
    [
        ("nmae: a\n", "nmae", "unknown key"),
        ("lora:\n  rnak: 4\n", "lora.rnak", "unknown key"),
        ("lora:\n  rank: many\n", "lora.rank", "integer"),
        ("lora:\n  rank: -1\n", "lora.rank", "greater than 0"),
        ("scheme: int3\n", "scheme", "'w4a16' or 'w8a8-int8'"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Stage, write(tmp_path, text))
    assert f"  {field}: " in str(err.value)
    assert expect in str(err.value)


def test_bad_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        load_config(Stage, None, ["lora.rank=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lora.rank"])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Stage, write(tmp_path, "- a\n- b\n"))
