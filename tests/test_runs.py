"""Run folders: same inputs skip, changed inputs (data or config) rerun."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from training.config import StrictModel
from training.runs import StageDir, fingerprint_path


class Cfg(StrictModel):
    lr: float = Field(1e-4, description="Learning rate.")


def run_stage(run_dir: Path, cfg: Cfg, data: Path, calls: list[int]) -> dict:
    stage = StageDir(run_dir, "sft", cfg, inputs={"data": data})
    if (done := stage.cached_result()) is not None:
        return done
    stage.start()
    calls.append(1)
    (stage.out / "weights.bin").write_bytes((data / "rows.jsonl").read_bytes() * 2)
    result = {"n": len(calls)}
    stage.save(result)
    return result


def test_same_inputs_skip_changed_inputs_rerun(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text('{"a": 1}\n')
    run_dir, calls = tmp_path / "runs" / "r1", []

    assert run_stage(run_dir, Cfg(), data, calls) == {"n": 1}
    assert run_stage(run_dir, Cfg(), data, calls) == {"n": 1}  # skipped
    assert len(calls) == 1
    assert (run_dir / "sft" / "config.yaml").read_text().startswith("lr:")
    assert set(json.loads((run_dir / "sft" / "fingerprints.json").read_text())) == {"config", "data"}

    (data / "rows.jsonl").write_text('{"a": 2}\n')  # same size, new content
    assert run_stage(run_dir, Cfg(), data, calls) == {"n": 2}
    assert run_stage(run_dir, Cfg(lr=1e-3), data, calls) == {"n": 3}
    assert len(calls) == 3


def test_partial_attempt_is_not_taken_as_done(tmp_path: Path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("x")
    stage = StageDir(tmp_path / "r", "dpo", Cfg(), inputs={"data": data})
    stage.start()
    (stage.out / "half.bin").write_bytes(b"1")  # crashed before save()
    assert StageDir(tmp_path / "r", "dpo", Cfg(), inputs={"data": data}).cached_result() is None


def test_folder_fingerprint_tracks_content_and_names(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1")
    first = fingerprint_path(tmp_path)
    assert fingerprint_path(tmp_path) == first  # cached path agrees
    (tmp_path / "a.txt").write_text("2")
    second = fingerprint_path(tmp_path)
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert len({first, second, fingerprint_path(tmp_path)}) == 3


def test_datasets_cache_files_do_not_change_the_fingerprint(tmp_path: Path) -> None:
    """`datasets` writes cache-*.arrow into a saved dataset when it is mapped; same content."""
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"rows")
    before = fingerprint_path(tmp_path)
    (tmp_path / "cache-3f2a.arrow").write_bytes(b"mapped")
    assert fingerprint_path(tmp_path) == before
