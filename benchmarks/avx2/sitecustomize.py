"""AVX2 emulation for the serving env's interpreter (benchmarks/avx2/run puts this on its path).

vLLM picks its CPU kernels from ``torch.cpu``'s capability checks (``_C_AVX2`` when
``torch.cpu._is_avx512_supported()`` is false; its attention and quantized-linear paths ask the
same functions). Here they report what an AVX2-only CPU reports; ``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS`` (set by ``run``) keep torch's own kernels,
oneDNN and MKL on AVX2 code. An approximation of a real AVX2-only CPU: same instructions, but this
machine's clock, caches and memory.
"""

import os
import sys

if os.environ.get("ALIGNLOOP_EMULATE_ISA", "").lower() == "avx2":
    from types import MappingProxyType

    import torch.cpu as _cpu

    _caps = dict(_cpu.get_capabilities())
    for _key in list(_caps):
        if _key.startswith(("avx512", "amx", "avx_vnni", "avx10")):
            _caps[_key] = False
    _cpu.get_capabilities = lambda: MappingProxyType(_caps)
    for _name in dir(_cpu):  # _is_avx512_supported, _is_amx_tile_supported, _is_vnni_supported, ...
        if _name.startswith(("_is_avx512", "_is_amx", "_is_vnni")) and _name.endswith("_supported"):
            setattr(_cpu, _name, lambda: False)
    print(f"[alignloop] AVX2 emulation in pid {os.getpid()}: torch.cpu reports no AVX-512/AMX",
          file=sys.stderr)
