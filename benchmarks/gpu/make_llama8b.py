"""Write config-only 8B-class Llama folders for ``vllm serve --load-format dummy`` (no weights).

    python benchmarks/gpu/make_llama8b.py DEST TOKENIZER_DIR

DEST gets ``bf16/``, ``w4a16/`` and ``fp8-dynamic/``: the same Llama (hidden 4096, 32 layers, 32
heads, GQA 8 KV heads, FFN 14336 as in Llama-3-8B, vocab 49152 so the SmolLM2 tokenizer fits),
each with the tokenizer and chat template of TOKENIZER_DIR. The quantized ones carry the
``quantization_config`` that llm-compressor writes for its presets (built here with
compressed-tensors' own ``preset_name_to_scheme``/``QuantizationConfig``): W4A16 = int4 weights,
symmetric, group 128, ``pack-quantized``; FP8_DYNAMIC = fp8 per-channel weights and dynamic
per-token fp8 activations, ``float-quantized``. ``lm_head`` stays bf16, as llm-compressor's
recipes leave it. vLLM's dummy loader then allocates the quantized parameters and fills them with
random values, which is enough to time the kernels.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "bfloat16",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
PRESETS = {"w4a16": ("W4A16", "pack-quantized"), "fp8-dynamic": ("FP8_DYNAMIC", "float-quantized")}


def _drop_none(d: object) -> object:
    """compressed-tensors 0.19 adds fields (scale_dtype, zp_dtype) that vLLM 0.26's 0.17 lacks;
    they are None for these presets, so leaving out every None keeps the config readable by both."""
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def quantization_config(scheme: str) -> dict:
    """The ``quantization_config`` llm-compressor would write for ``scheme`` (w4a16 | fp8-dynamic)."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset, fmt = PRESETS[scheme]
    cfg = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
        format=fmt,
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    return _drop_none(cfg.model_dump())


def parameter_bytes(scheme: str, cfg: dict = LLAMA_8B) -> dict[str, float]:
    """Bytes of weights read per decode step (batch 1) for the roofline: linear layers at the
    scheme's width (+ scales), embeddings/lm_head/norms in bf16. Only the lm_head row block is
    read for logits, but the embedding lookup reads one row: count lm_head fully, embed not."""
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    linear = n * (h * h * 2 + h * kv * 2 + 3 * h * f)  # q,o + k,v + gate,up,down
    lm_head = h * cfg["vocab_size"]
    per_weight = {"bf16": 2.0, "w4a16": 0.5 + 2.0 / 128, "fp8-dynamic": 1.0}[scheme]
    scales = (
        0 if scheme != "fp8-dynamic" else n * (2 * h + 2 * kv + 2 * f + h) * 4
    )  # per-channel fp32
    total = linear * per_weight + scales + lm_head * 2 + n * 2 * h * 2
    return {"linear_params": float(linear), "bytes_per_token": float(total)}


def write(dest: Path, tokenizer_dir: Path) -> list[Path]:
    out = []
    for scheme in ("bf16", "w4a16", "fp8-dynamic"):
        folder = dest / scheme
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(LLAMA_8B)
        if scheme != "bf16":
            config["quantization_config"] = quantization_config(scheme)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)
        out.append(folder)
    return out


if __name__ == "__main__":
    for f in write(Path(sys.argv[1]), Path(sys.argv[2])):
        print(f)
