"""Device side: import what each env needs and print versions (seconds; before the long runs).

python3 benchmarks/gpu/check_env.py          (pipeline env, after device_env.sh)
"""

import importlib
import json
import sys
import time

PIPELINE = [
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "llmcompressor",
    "compressed_tensors",
    "lm_eval",
    "presidio_analyzer",
    "presidio_anonymizer",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
    "openai",
    "httpx",
    "pydantic",
    "numpy",
    "pyarrow",
]

if __name__ == "__main__":
    t0 = time.monotonic()
    out, bad = {}, {}
    for name in PIPELINE:
        try:
            mod = importlib.import_module(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as exc:  # report them all, not only the first
            bad[name] = f"{type(exc).__name__}: {exc}"[:300]
    for name in [
        "serving.app",
        "evals.perf",
        "evals.quality",
        "training.sft",
        "training.dpo",
        "training.merge",
        "training.quantize",
        "guardrails.pii",
    ]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            bad[name] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({"versions": out, "failed": bad, "seconds": round(time.monotonic() - t0, 1)}))
    sys.exit(1 if bad else 0)
