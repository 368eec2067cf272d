"""The loop's GPU wiring as data: what a release really serves, and which kernels a candidate is
staged with (the serving choice then picks scheme and kernel; the promoted release runs it)."""

from __future__ import annotations

import json
from pathlib import Path

from flows import gpu
from flows.loop_config import load_loop_config
from serving.engine.vllm_server import VLLMArgs


def _model(tmp_path: Path, name: str, preset: str | None) -> Path:
    """A model folder whose config.json carries the quantization_config llm-compressor writes."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    folder = tmp_path / name
    folder.mkdir()
    cfg: dict = {"model_type": "llama"}
    if preset:
        q = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                               quantization_status="compressed", ignore=["lm_head"])
        cfg["quantization_config"] = json.loads(q.model_dump_json())
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_scheme_of_model_reads_llm_compressor_presets(tmp_path: Path) -> None:
    from evals.serving_choice import scheme_of_model

    assert scheme_of_model(_model(tmp_path, "plain", None)) == "bf16"
    assert scheme_of_model(_model(tmp_path, "int4", "W4A16")) == "w4a16"
    assert scheme_of_model(_model(tmp_path, "int8", "W8A8")) == "w8a8-int8"
    assert scheme_of_model(_model(tmp_path, "fp8", "FP8_DYNAMIC")) == "fp8-dynamic"


def test_live_release_is_labelled_with_what_it_serves(tmp_path: Path) -> None:
    int4 = str(_model(tmp_path, "int4", "W4A16"))
    marlin = gpu.kernel_args(VLLMArgs(env={"X": "1"}), "marlin")
    assert marlin.env == {"X": "1", "VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}
    live = {"model_dir": int4, "vllm_args": marlin.model_dump(mode="json")}
    assert gpu.served_label(live) == ("w4a16", "marlin")
    assert gpu.served_label({"model_dir": int4, "vllm_args": VLLMArgs().model_dump()}) == ("w4a16", "default")


def test_kernels_tried_per_scheme_and_machine() -> None:
    cfg = load_loop_config("configs/loop.yaml")
    on_cpu = {"placement": {"devices": [], "share": None}}
    on_gpu = {"placement": {"devices": [0], "share": 0.15}}
    assert gpu.kernels_for(cfg, "w4a16", on_cpu) == ["default"]  # a CPU has one int4 path
    assert gpu.kernels_for(cfg, "w4a16", {}) == ["default"]  # a release never placed
    assert gpu.kernels_for(cfg, "w4a16", on_gpu) == ["default", "marlin"]
    assert gpu.kernels_for(cfg, "fp8-dynamic", on_gpu) == ["default"]
    assert gpu.kernels_for(cfg, "bf16", on_gpu) == ["default"]
    only = load_loop_config("configs/loop.yaml", ["kernels=[marlin]"])
    assert gpu.kernels_for(only, "w4a16", on_gpu) == ["marlin"]
    assert gpu.KERNEL_VARIANT_SUFFIX["marlin"] == "-marlin"
