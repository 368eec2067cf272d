"""Lineage walks over run folders and release records, and where the next run's training starts.

The folders are laid out as the stages write them, with result.json files made from the stages'
own result dataclasses (so a field renamed there breaks this test); the release records are real
(serving.releases.store.ReleaseStore). The flow test runs the same walk on folders the stages wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from serving.engine.vllm_server import VLLMArgs
from serving.releases.store import ReleaseStore, live_lineage
from training.lineage import resolve_start
from training.merge import MergeResult
from training.quantize import QuantizeResult


def model_folder(path: Path, quantized: bool = False) -> Path:
    path.mkdir(parents=True)
    cfg = {"model_type": "llama", **({"quantization_config": {"format": "int-quantized"}} if quantized else {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def finished(stage: Path, result: dict) -> None:
    (stage / "result.json").write_text(json.dumps(result))


def a_run(runs: Path, name: str, base: Path, windows: list[str], quantize: bool) -> tuple[Path, Path]:
    """A run folder: data manifest naming its windows, merged model on ``base``, maybe an int8 copy."""
    run = runs / name
    (run / "data" / "output").mkdir(parents=True)
    manifest = run / "data" / "output" / "manifest.json"
    manifest.write_text(json.dumps({"ledger": {"dataset_version": f"ds-{name}", "train_windows": windows}}))
    finished(run / "data", {"manifest_path": str(manifest)})
    merged = model_folder(run / "merge" / "output" / "model")
    finished(run / "merge", asdict(MergeResult(
        stage_dir=str(run / "merge"), model_dir=str(merged), base_model=str(base),
        adapters=[str(run / "sft/output/adapter"), str(run / "dpo/output/adapter")], dtype="bfloat16",
        max_logit_diff=0.0, max_logit_diff_saved_dtype=0.0, delta_rounding_error=None,
        model_bytes=1, wall_s=1.0,
    )))
    if not quantize:
        return run, merged
    quant = model_folder(run / "quantize" / "output" / "model", quantized=True)
    finished(run / "quantize", asdict(QuantizeResult(
        stage_dir=str(run / "quantize"), model_dir=str(quant), source_model=str(merged),
        scheme="w8a8-int8", target="cpu", group_size=None, calibration_rows=1, calibration_tokens=1,
        size_before_bytes=2, size_after_bytes=1, quantize_s=1.0, wall_s=1.0, threads=1,
    )))
    return run, quant


def test_live_lineage_walks_quantized_releases_back_to_the_base(tmp_path: Path, data_home: Path) -> None:
    store = ReleaseStore(data_home / "releases")
    base = model_folder(tmp_path / "base")
    first = store.create(base, VLLMArgs())
    store.set_status(first.release_id, "live", "initial")
    live = live_lineage(store.root)
    assert live.steps == [] and live.full_model == str(base) and live.trained_windows == []
    assert resolve_start("live", "embedded", live).model == str(base)

    # Window 1 trained from base and its int8 copy was promoted; window 2 continued from it.
    run1, int8 = a_run(tmp_path / "runs", "w-1", base, ["w-1"], quantize=True)
    run2, merged2 = a_run(tmp_path / "runs", "w-2", run1 / "merge/output/model", ["w-2", "w-0"], quantize=False)
    for model in (int8, merged2):
        rel = store.create(model, VLLMArgs())
        store.set_status(rel.release_id, "staged", "")
        store.promote_offline(rel.release_id, force=True, reason="test")
    live = live_lineage(store.root)
    assert [s.window for s in live.steps] == ["w-2", "w-1"]
    assert [s.dataset_version for s in live.steps] == ["ds-w-2", "ds-w-1"]
    assert live.trained_windows == ["w-1", "w-2", "w-0"]
    assert live.root_model == str(base)

    start = resolve_start("live", "embedded", live)
    assert start.model == str(merged2) and start.live_release == live.release_id
    assert "continue from live release" in start.describe() and "2 earlier runs" in start.describe()
    assert resolve_start("base", "embedded", live).model == "embedded"
    # `alignloop release list` shows the chain (no gateway running: the persisted state).
    from typer.testing import CliRunner

    from flows.cli_serving import release_app

    out = CliRunner().invoke(release_app, ["list"])
    assert out.exit_code == 0, out.output
    assert f"lineage: w-2 (ds-w-2, sft+dpo) <- w-1 (ds-w-1, sft+dpo) <- base {base}" in out.output

    # An int8 release's trainable weights are its quantize stage's source model.
    store.rollback_offline("back to the int8 release")
    live = live_lineage(store.root)
    assert live.serving_model == str(int8) and live.full_model == str(run1 / "merge/output/model")
    assert live.trained_windows == ["w-1"]


def test_start_from_live_needs_trainable_weights(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "releases")
    stray = model_folder(tmp_path / "someone-elses-int8", quantized=True)
    rel = store.create(stray, VLLMArgs())
    store.set_status(rel.release_id, "live", "initial")
    with pytest.raises(ValueError, match="quantized and not the output of a quantize stage"):
        live_lineage(store.root)
    with pytest.raises(ValueError, match="start_from=live: no release is live"):
        resolve_start("live", "embedded", None)
    assert live_lineage(tmp_path / "nothing-here") is None
    assert not (tmp_path / "nothing-here").exists()  # reading never creates the folder
