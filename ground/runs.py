"""Run folders: ``runs/<run_id>/<stage>/`` with config.yaml, fingerprints.json and result.json.

A stage is skipped when its folder already holds a result produced from the same resolved config
and the same input fingerprints (content hashes), which makes scheduled runs resumable and
idempotent. Lineage is a walk over these folders.

Usage inside a stage's ``run(cfg)``::

    stage = StageDir(run_dir, "sft", cfg, inputs={"dataset": ds_path, "base": model_dir})
    if (done := stage.cached_result()) is not None:
        return SFTResult(**done)
    stage.start()                      # clears a partial attempt, writes config + fingerprints
    ... write outputs under stage.out ...
    stage.save(asdict(result))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ground.config import data_dir, dump_config

log = logging.getLogger(__name__)

# Where earlier versions cached per-file hashes: inside the hashed folder (a user's model folder).
# Such files may still be there; they are not content.
_LEGACY_HASH_CACHE = ".fingerprint-cache.json"


def _is_derived(name: str) -> bool:
    """Files that tools add beside the content without changing it: an old in-folder hash cache,
    and the ``cache-*.arrow`` files that ``datasets`` writes into a saved dataset when mapped."""
    return name == _LEGACY_HASH_CACHE or (name.startswith("cache-") and name.endswith(".arrow"))


def _hash_cache_file(folder: Path) -> Path:
    """The per-file hash cache of ``folder``: under the data dir, keyed by the folder's path."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return data_dir() / "cache" / "fingerprints" / f"{key}.json"


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_obj(obj: Any) -> str:
    """Hash of a JSON-serialisable object (or a pydantic model), key order independent."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return fingerprint_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """Content hash of a file or a folder (relative paths + file contents, sorted).

    Per-file hashes of a folder are cached under the data dir (``cache/fingerprints/``), keyed by
    the folder's path and each file's (size, mtime), so re-hashing an unchanged multi-GB model
    folder costs a stat per file. Nothing is written into the folder itself: it may be a user's.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot fingerprint {path}: it does not exist")
    if path.is_file():
        return _file_sha256(path)
    cache_file = _hash_cache_file(path)
    try:
        stored = json.loads(cache_file.read_text())
        cache: dict[str, list] = stored["files"] if stored.get("path") == str(path.resolve()) else {}
    except (OSError, ValueError, KeyError, AttributeError):
        cache = {}
    fresh: dict[str, list] = {}
    outer = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _is_derived(p.name)):
        rel = f.relative_to(path).as_posix()
        st = f.stat()
        key = [st.st_size, st.st_mtime_ns]
        hit = cache.get(rel)
        digest = hit[2] if hit and hit[:2] == key else _file_sha256(f)
        fresh[rel] = [*key, digest]
        outer.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    if fresh != cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path.resolve()), "files": fresh}))
            tmp.replace(cache_file)  # atomic: concurrent runs never read half a cache
        except OSError:  # read-only data dir: hashing still works, just not cached
            pass
    return outer.hexdigest()


def folder_bytes(path: str | Path) -> int:
    """Size on disk of every file under ``path`` (model and adapter sizes in results and evals)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fingerprint_input(value: Any) -> str:
    """A path that exists is hashed by content; anything else by its JSON value."""
    if isinstance(value, str | Path) and Path(value).exists():
        return fingerprint_path(value)
    return fingerprint_obj(value)


def new_run_id(label: str = "") -> str:
    """A sortable run id: UTC timestamp plus an optional label (e.g. the data window)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{label}" if label else stamp


class StageDir:
    """The folder of one stage of one run, and the skip-if-done rule."""

    def __init__(
        self, run_dir: str | Path, stage: str, config: BaseModel, inputs: dict[str, Any]
    ) -> None:
        self.path = Path(run_dir) / stage
        self.stage = stage
        self.config = config
        self.fingerprints = {
            "config": fingerprint_obj(config),
            **{name: fingerprint_input(v) for name, v in sorted(inputs.items())},
        }

    @property
    def out(self) -> Path:
        """Where the stage writes its outputs (created on first use)."""
        out = self.path / "output"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def cached_result(self) -> dict[str, Any] | None:
        """The stored result if this stage already finished with the same fingerprints."""
        result_file, fp_file = self.path / "result.json", self.path / "fingerprints.json"
        if not (result_file.is_file() and fp_file.is_file()):
            return None
        try:
            if json.loads(fp_file.read_text()) != self.fingerprints:
                log.info("%s: inputs changed since the last run; running again", self.stage)
                return None
            result = json.loads(result_file.read_text())
        except ValueError:
            return None
        log.info("%s: same inputs as %s; skipped", self.stage, self.path)
        return result

    def start(self) -> None:
        """Clear a stale or partial previous attempt and record config + fingerprints."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        (self.path / "config.yaml").write_text(dump_config(self.config))
        (self.path / "fingerprints.json").write_text(json.dumps(self.fingerprints, indent=2))

    def save(self, result: dict[str, Any]) -> None:
        """Write result.json last: its presence marks the stage as finished."""
        tmp = self.path / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.path / "result.json")
