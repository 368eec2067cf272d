"""Platform choices: dtype and quantization scheme follow the CPU flags and GPUs."""

from __future__ import annotations

from serving.platform import (
    Platform,
    default_quant_scheme,
    servable_schemes,
    serving_dtype,
    training_dtype,
)
from serving.vllm_server import VLLMArgs, build_command


def make(flags: set[str], gpus: tuple[str, ...] = ()) -> Platform:
    return Platform("cpu", frozenset(flags), 2, 24.0, gpus)


def test_avx2_only_cpu() -> None:
    p = make({"avx", "avx2"})
    assert serving_dtype(p) == "float32"  # bf16 gives garbage there (PLATFORM.md)
    assert default_quant_scheme(p) == "w8a8-int8"  # no int4 kernel in the AVX2 build
    assert servable_schemes(p) == ("w8a8-int8",)


def test_avx512_bf16_cpu() -> None:
    p = make({"avx2", "avx512f", "avx512_bf16"})
    assert serving_dtype(p) == "bfloat16"
    assert training_dtype(p) == "float32"
    assert default_quant_scheme(p) == "w8a8-int8"  # int4 is servable but measured slower than bf16
    assert "w4a16" in servable_schemes(p)


def test_gpu() -> None:
    p = make({"avx2"}, ("NVIDIA H100 80GB HBM3",))
    assert (serving_dtype(p), training_dtype(p), default_quant_scheme(p)) == ("bfloat16", "bfloat16", "w4a16")
    assert "fp8-dynamic" in servable_schemes(p)


def test_vllm_command_per_platform() -> None:
    cmd, env = build_command("/m", 8000, VLLMArgs(kv_cache_gib=2), "m", make({"avx2"}))
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in cmd and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "--gpu-memory-utilization" not in cmd
    args = VLLMArgs(gpu_memory_utilization=0.5, env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"})
    cmd, env = build_command("/m", 8000, args, "m", make(set(), ("H100",)))
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--enforce-eager" not in cmd and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert env["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel"
