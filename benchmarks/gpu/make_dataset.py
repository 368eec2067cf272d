"""Build the GPU run's training data with the project's data stage, on the CPU machine.

    python benchmarks/gpu/make_dataset.py OUT_DIR

The demo prompt pool (training/demo/prompts.jsonl) becomes JSONL exchanges whose served answer
is an unhelpful generic reply, each with one ``edit`` feedback carrying the pool's
policy-compliant reference answer: the data stage (training.data.run, log store off) turns each
into an SFT row (the edit) and a DPO pair (edit chosen over the original), then governs them
(PII scrub, decontamination against evals/tasks, near-dup clusters, held-out split). The
datasets are tiny on disk, so the GPU call carries the result instead of a log store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GENERIC = "I am not sure about that. Please look it up yourself."


def write_jsonl(dest: Path) -> Path:
    from training.simulate import load_pool

    lines = []
    for item in load_pool():
        lines.append(
            json.dumps(
                {
                    "id": f"gpu-{item['id']}",
                    "messages": [
                        {"role": "user", "content": item["prompt"]},
                        {"role": "assistant", "content": GENERIC},
                    ],
                    "feedback": [{"edit": {"text": item["reference"]}}],
                }
            )
        )
    dest.write_text("\n".join(lines) + "\n")
    return dest


def main(out: Path) -> None:
    from training.config import build_config
    from training.data import DataConfig, run

    out.mkdir(parents=True, exist_ok=True)
    src = write_jsonl(out / "pool_edits.jsonl")
    cfg = build_config(
        DataConfig,
        {"run_dir": str(out / "run"), "logstore": {"enabled": False}, "jsonl": [str(src)]},
    )
    res = run(cfg)
    print(json.dumps({"dataset_path": res.dataset_path, "counts": res.counts}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
