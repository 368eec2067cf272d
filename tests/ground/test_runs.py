"""Run folders: same inputs skip, changed inputs (data or config) rerun."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from ground.config import StrictModel
from ground.runs import StageDir, fingerprint_path


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


def test_folder_fingerprint_tracks_content_and_names(tmp_path: Path, data_home: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("1")
    first = fingerprint_path(folder)
    assert fingerprint_path(folder) == first  # cached path agrees
    (folder / "a.txt").write_text("2")
    second = fingerprint_path(folder)
    (folder / "a.txt").rename(folder / "b.txt")
    assert len({first, second, fingerprint_path(folder)}) == 3


def test_fingerprint_cache_lives_in_the_data_dir_not_the_folder(tmp_path: Path, data_home: Path) -> None:
    """A user's model folder is read, never written; the cache is keyed by path, size, mtime."""
    folder = tmp_path / "user-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    before = sorted(p.name for p in folder.iterdir())
    first = fingerprint_path(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    caches = list((data_home / "cache" / "fingerprints").glob("*.json"))
    assert len(caches) == 1 and json.loads(caches[0].read_text())["path"] == str(folder.resolve())
    # A cache entry is used only while size and mtime match: a rewrite with the same size is seen.
    (folder / "weights.bin").write_bytes(b"v" * 1000)
    assert fingerprint_path(folder) != first
    # An old in-folder cache file (earlier versions wrote one) is not content.
    (folder / ".fingerprint-cache.json").write_text("{}")
    assert fingerprint_path(folder) == fingerprint_path(folder)
    assert fingerprint_path(folder) != first


def test_datasets_cache_files_do_not_change_the_fingerprint(tmp_path: Path, data_home: Path) -> None:
    """`datasets` writes cache-*.arrow into a saved dataset when it is mapped; same content."""
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "data-00000-of-00001.arrow").write_bytes(b"rows")
    before = fingerprint_path(ds)
    (ds / "cache-3f2a.arrow").write_bytes(b"mapped")
    assert fingerprint_path(ds) == before
