"""Quantize stage: AWQ with llm-compressor (``oneshot`` + ``AWQModifier``) into a compressed-tensors folder.

The scheme is chosen for the serving target (``ground.platform``): W4A16 on GPUs, W8A8-int8 on
CPUs (AVX2-only CPUs have no int4 kernel; on AVX-512 CPUs int4 is servable but measured slower
than bf16); a scheme the target cannot serve is refused. W4A16's group size is derived from the layer widths: the largest of 128/64/32 that
divides every quantized layer's ``in_features`` (SmolLM2's 576 and 1536 -> 64). Calibration rows
are the SFT split's conversations, chat-templated, so AWQ sees the activations the served model
will see. Only merged, full-precision folders are accepted (merge-then-quantize).

Run: ``alignloop quantize --config configs/quantize.yaml model_dir=<run>/merge/output/model dataset_path=...``
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ground.config import StrictModel
from ground.platform import (
    Platform,
    cached,
    default_quant_scheme,
    detect,
    servable_schemes,
    serving_dtype,
)
from ground.runs import StageDir, folder_bytes
from training.lora import is_quantized, resolve_run_dir, set_threads
from training.stage import load_tokenizer

log = logging.getLogger(__name__)

Target = Literal["this-machine", "gpu", "cpu-avx512", "cpu-avx2"]
GROUP_SIZES = (128, 64, 32)


class QuantizeConfig(StrictModel):
    """The quantize stage (``configs/quantize.yaml``)."""

    model_dir: str = Field(..., description="Merged full-precision model folder (<run>/merge/output/model).")
    dataset_path: str = Field(..., description="DatasetDict folder whose SFT split gives calibration rows.")
    calibration_split: str = Field("sft", description="Split to take calibration conversations from.")
    num_samples: int = Field(32, ge=1, description="Calibration rows (fewer rows in the split: all of them).")
    max_seq_length: int = Field(256, ge=8, description="Calibration rows are truncated to this many tokens.")
    scheme: Literal["auto", "w4a16", "w8a8-int8", "fp8-dynamic"] = Field(
        "auto", description="'auto' = the target's default (ground.platform.default_quant_scheme)."
    )
    target: Target = Field("this-machine", description="Hardware that will serve the model; decides scheme and checks.")
    group_size: int | None = Field(None, ge=8, description="W4A16 group size; None = derived from the layer widths.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="Layers left unquantized.")
    n_grid: int = Field(20, ge=2, description="AWQ scale grid points per layer (fewer = faster, coarser).")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None = all cores.")
    run_dir: str | None = Field(None, description="Run folder; None = the run that holds model_dir, else a new one.")


@dataclass
class QuantizeResult:
    """What the quantize stage produced (also ``result.json``)."""

    stage_dir: str
    model_dir: str
    source_model: str
    scheme: str
    target: str
    group_size: int | None
    calibration_rows: int
    calibration_tokens: int
    size_before_bytes: int
    size_after_bytes: int
    quantize_s: float
    wall_s: float
    threads: int
    skipped: bool = False


def target_platform(target: Target) -> Any:
    """The :class:`ground.platform.Platform` a target names (this machine's own by default)."""
    if target == "this-machine":
        return detect()
    flags = {"gpu": {"avx2"}, "cpu-avx512": {"avx2", "avx512f"}, "cpu-avx2": {"avx2"}}[target]
    gpus = ("target GPU",) if target == "gpu" else ()
    return Platform(cpu_model=target, cpu_flags=frozenset(flags), cores=0, ram_gib=0.0, gpu_names=gpus)


def choose_scheme(requested: str, target: Target) -> str:
    """The scheme to use; refuse one the target's vLLM cannot serve.

    ``auto`` on this machine's CPU follows the platform probe once it has measured here (see
    :func:`serving.engine.probe.plan_scheme`); otherwise, and for other targets, the target's default.
    """
    p = target_platform(target)
    scheme = default_quant_scheme(p) if requested == "auto" else requested
    measured = cached(p) if requested == "auto" and target == "this-machine" else None
    if measured is not None and measured.scheme:
        scheme = measured.scheme
    allowed = servable_schemes(p)
    if scheme not in allowed:
        raise ValueError(
            f"scheme: {scheme!r} cannot be served on target {target!r} ({p.isa}); servable there: "
            f"{list(allowed)} (vLLM's CPU int4 kernel needs AVX-512; fp8 needs a GPU)"
        )
    return scheme


def derive_group_size(in_features: list[int]) -> int:
    """Largest of 128/64/32 dividing every quantized layer's input width."""
    for g in GROUP_SIZES:
        if all(n % g == 0 for n in in_features):
            return g
    raise ValueError(
        f"group_size: no group size in {GROUP_SIZES} divides every layer width {sorted(set(in_features))}; "
        "set group_size, add the odd layers to ignore, or use scheme=w8a8-int8 (channel-wise)"
    )


def quantized_linear_widths(model: Any, ignore: list[str]) -> list[int]:
    # lazy: torch, seconds and hundreds of MB
    import torch

    return [
        m.in_features for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name == i or name.endswith("." + i) for i in ignore)
    ]


def build_recipe(scheme: str, group_size: int | None, ignore: list[str], n_grid: int) -> list[Any]:
    """AWQ smoothing followed by the quantization modifier for ``scheme``."""
    # lazy: compressed_tensors, imports torch; llmcompressor, imports torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if scheme == "fp8-dynamic":  # per-channel fp8 weights, dynamic activations: no calibration
        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=ignore)]
    if scheme == "w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    else:  # w8a8-int8: channel-wise int8 weights, dynamic per-token int8 activations
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}
    return [AWQModifier(n_grid=n_grid), QuantizationModifier(config_groups=groups, ignore=ignore)]


def quantize_round_to_nearest(model_dir: str | Path, scheme: str, out: str | Path) -> Path:
    """A data-free (round-to-nearest) ``scheme`` copy of ``model_dir``, for timing kernels.

    The platform probe needs a model in each scheme to see how fast this machine serves it; AWQ's
    calibration would only change the weights' values, not the kernels' speed.
    """
    # lazy: torch, seconds and hundreds of MB; compressed_tensors, imports torch; llmcompressor, imports torch; transformers, imports torch
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = load_tokenizer(str(model_dir))
    ignore = ["lm_head"]
    if scheme == "w4a16":
        group = derive_group_size(quantized_linear_widths(model, ignore))
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    elif scheme == "w8a8-int8":
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}
    else:
        raise ValueError(f"scheme: {scheme!r}: the probe times w4a16 and w8a8-int8 on CPUs")
    with _cpu_pin_memory_workaround():
        oneshot(model=model, recipe=[QuantizationModifier(config_groups=groups, ignore=ignore)])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def calibration_dataset(cfg: QuantizeConfig, tok: Any) -> Any:
    """The SFT split's conversations, chat-templated and tokenized (input_ids, attention_mask)."""
    # lazy: datasets, pyarrow and pandas
    from datasets import load_from_disk

    path = Path(cfg.dataset_path)
    if not path.exists():
        raise FileNotFoundError(f"dataset_path: {path} does not exist")
    # In memory: later .map() calls must not write cache-*.arrow files into the input folder,
    # which would change its fingerprint and defeat stage skipping.
    dd = load_from_disk(str(path), keep_in_memory=True)
    if cfg.calibration_split not in dd:
        raise ValueError(f"calibration_split: {cfg.calibration_split!r} not in {path} (has {list(dd.keys())})")
    ds = dd[cfg.calibration_split]
    if len(ds) == 0:
        raise ValueError(f"calibration_split: {cfg.calibration_split!r} of {path} is empty")
    if len(ds) < cfg.num_samples:
        log.warning("quantize: only %d calibration rows (num_samples=%d)", len(ds), cfg.num_samples)
    ds = ds.shuffle(seed=0).select(range(min(cfg.num_samples, len(ds))))

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        text = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        enc = tok(text, truncation=True, max_length=cfg.max_seq_length, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return ds.map(encode, remove_columns=ds.column_names, desc="chat-templating calibration rows")


@contextlib.contextmanager
def _cpu_pin_memory_workaround() -> Iterator[None]:
    """llmcompressor 0.14.0.1: AWQ pins cached activations (``IntermediatesCache.pin_memory``),
    which crashes on a CPU-only torch ("Cannot access accelerator device when none is
    available"). Pinning only speeds host-to-GPU copies, so without CUDA it is skipped.
    Remove when llmcompressor guards it itself."""
    # lazy: torch, seconds and hundreds of MB; llmcompressor, imports torch
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def check_quantizable(model_dir: Path) -> None:
    """Only a merged, full-precision model folder may be quantized."""
    if (model_dir / "adapter_config.json").is_file():
        raise ValueError(
            f"model_dir: {model_dir} carries a LoRA adapter (adapter_config.json); merge it first "
            "(alignloop merge), then quantize the merged folder (merge-then-quantize is the only order)"
        )
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model_dir: no model folder (config.json) at {model_dir}")
    if is_quantized(model_dir):
        raise ValueError(f"model_dir: {model_dir} is already quantized (config.json has quantization_config)")


def run(cfg: QuantizeConfig) -> QuantizeResult:
    """AWQ-quantize the merged model for the target (skipped when the inputs are unchanged)."""
    t0 = time.monotonic()
    source = Path(cfg.model_dir).expanduser().resolve()
    check_quantizable(source)
    scheme = choose_scheme(cfg.scheme, cfg.target)
    run_dir = resolve_run_dir(cfg.run_dir, source)
    stage = StageDir(run_dir, "quantize", cfg, inputs={"model": str(source), "dataset": cfg.dataset_path})
    if (done := stage.cached_result()) is not None:
        return QuantizeResult(**{**done, "skipped": True})
    stage.start()

    # lazy: torch, seconds and hundreds of MB; llmcompressor, imports torch; transformers, imports torch
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    threads = set_threads(cfg.threads)
    tok = load_tokenizer(str(source))
    calib = calibration_dataset(cfg, tok)
    # Calibrate in the dtype this machine computes well; it is also the dtype of the
    # unquantized parts (embeddings, norms) in the saved folder.
    dtype = getattr(torch, serving_dtype(detect()))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    group_size = None
    if scheme == "w4a16":
        group_size = cfg.group_size or derive_group_size(quantized_linear_widths(model, cfg.ignore))
    log.info("quantize: %s -> %s (group %s) for %s, %d calibration rows x <= %d tokens, %s",
             source, scheme, group_size, cfg.target, len(calib), cfg.max_seq_length, dtype)
    t_q = time.monotonic()
    with _cpu_pin_memory_workaround():
        oneshot(
            model=model, processor=tok, dataset=calib,
            recipe=build_recipe(scheme, group_size, cfg.ignore, cfg.n_grid),
            num_calibration_samples=len(calib), max_seq_length=cfg.max_seq_length,
        )
    quantize_s = time.monotonic() - t_q
    out = stage.out / "model"
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")
    result = QuantizeResult(
        stage_dir=str(stage.path), model_dir=str(out), source_model=str(source), scheme=scheme,
        target=cfg.target, group_size=group_size, calibration_rows=len(calib),
        calibration_tokens=sum(len(x) for x in calib["input_ids"]),
        size_before_bytes=folder_bytes(source), size_after_bytes=folder_bytes(out),
        quantize_s=round(quantize_s, 2), wall_s=round(time.monotonic() - t0, 2), threads=threads,
    )
    stage.save(asdict(result))
    log.info("quantize: %s in %.0fs, %.0f MB -> %.0f MB: %s", scheme, quantize_s,
             result.size_before_bytes / 1e6, result.size_after_bytes / 1e6, out)
    return result
