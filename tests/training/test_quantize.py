"""Quantize stage: scheme/group-size choices, merge-then-quantize refusals, and real AWQ runs whose
output the serving env's vLLM loads and answers with (real server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from ground.config import build_config
from ground.platform import detect
from training.quantize import QuantizeConfig, choose_scheme, derive_group_size, run


def quantize_config(model_dir: Path, dataset: Path, run_dir: Path, **extra) -> QuantizeConfig:
    return build_config(QuantizeConfig, {
        "model_dir": str(model_dir), "dataset_path": str(dataset), "run_dir": str(run_dir),
        "num_samples": 8, "max_seq_length": 64, "n_grid": 4, **extra,
    })


def test_group_size_from_layer_widths() -> None:
    assert derive_group_size([576, 1536, 576]) == 64  # SmolLM2-135M
    assert derive_group_size([128, 256]) == 128  # the tiny test model
    assert derive_group_size([4096, 14336]) == 128
    assert derive_group_size([96, 160]) == 32
    with pytest.raises(ValueError, match="group_size: no group size"):
        derive_group_size([100, 128])


def test_scheme_for_target() -> None:
    assert choose_scheme("auto", "cpu-avx2") == "w8a8-int8"
    assert choose_scheme("auto", "cpu-avx512") == "w8a8-int8"  # int4 measured slower than bf16 there
    assert choose_scheme("w4a16", "cpu-avx512") == "w4a16"  # but servable when asked for
    assert choose_scheme("auto", "gpu") == "w4a16"
    assert choose_scheme("fp8-dynamic", "gpu") == "fp8-dynamic"
    with pytest.raises(ValueError, match="scheme: 'w4a16' cannot be served on target 'cpu-avx2'"):
        choose_scheme("w4a16", "cpu-avx2")
    with pytest.raises(ValueError, match="scheme: 'fp8-dynamic' cannot be served"):
        choose_scheme("fp8-dynamic", "cpu-avx512")


@pytest.mark.slow  # the tiny model needs the embedded model's tokenizer
def test_refuses_adapter_folders_and_quantized_models(tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    with_adapter = tmp_path / "with-adapter"
    shutil.copytree(tiny_model_dir, with_adapter)
    (with_adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="carries a LoRA adapter .* merge it first"):
        run(quantize_config(with_adapter, tiny_dataset, tmp_path / "run"))
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="already quantized"):
        run(quantize_config(quantized, tiny_dataset, tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="model_dir: no model folder"):
        run(quantize_config(tmp_path / "missing", tiny_dataset, tmp_path / "run"))
    with pytest.raises(ValueError, match="scheme: 'w4a16' cannot be served"):
        run(quantize_config(tiny_model_dir, tiny_dataset, tmp_path / "run", scheme="w4a16", target="cpu-avx2"))


def _chat(server, text: str) -> str:
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
        "model": server.served_name, "messages": [{"role": "user", "content": text}],
        "max_tokens": 8, "temperature": 0,
    })
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _quantize_and_serve(scheme: str, tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> dict:
    from serving.engine.vllm_server import VLLMArgs, VLLMServer

    result = run(quantize_config(tiny_model_dir, dataset, tmp_path / "run", scheme=scheme))
    assert result.scheme == scheme and result.calibration_rows == 8
    qcfg = json.loads((Path(result.model_dir) / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert "lm_head" in qcfg["ignore"]
    with VLLMServer(result.model_dir, args=VLLMArgs(max_model_len=512, kv_cache_gib=1),
                    log_path=tmp_path / "vllm.log", served_name="q") as server:
        assert isinstance(_chat(server, "Hello, who are you?"), str)
    return {"result": result, "weights": weights}


@pytest.mark.integration
def test_w8a8_int8_is_served_by_vllm(tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = _quantize_and_serve("w8a8-int8", tiny_model_dir, tiny_dataset, tmp_path)
    assert out["weights"]["num_bits"] == 8 and out["weights"]["strategy"] == "channel"
    assert out["result"].group_size is None


@pytest.mark.integration
@pytest.mark.skipif(not detect().avx512 and not detect().has_gpu, reason="vLLM's CPU int4 kernel needs AVX-512")
def test_w4a16_is_served_by_vllm(tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = _quantize_and_serve("w4a16", tiny_model_dir, tiny_dataset, tmp_path)
    assert out["weights"]["num_bits"] == 4 and out["weights"]["group_size"] == 128  # widths 128/256
    assert out["result"].group_size == 128


@pytest.mark.integration
def test_quantize_skips_unchanged_inputs(tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = quantize_config(tiny_model_dir, tiny_dataset, tmp_path / "run", scheme="w8a8-int8", num_samples=4)
    first = run(cfg)
    assert not first.skipped and first.size_after_bytes > 0
    assert run(cfg).skipped
    assert not run(cfg.model_copy(update={"num_samples": 5})).skipped  # config changed: rerun
