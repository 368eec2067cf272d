"""LoRA SFT throughput on 1 and 2 GPUs (DDP through `accelerate launch`) and training MFU.

    .venv/bin/python benchmarks/gpu/train_scaling.py --out DIR [--model 8b|embedded] [--gpus 1,2] [--devices 0,1]
    .venv/bin/python benchmarks/gpu/train_scaling.py --out DIR --cpu-dry-run   (mechanics, on a CPU)

For each process count the script launches itself with the command the product's training
launcher builds (:func:`training.launch.accelerate_command`, DDP), and each rank trains a LoRA
with TRL's SFTTrainer configured exactly as the SFT stage configures it
(:func:`training.lora.trainer_kwargs`, :func:`training.lora.to_lora_config`), on fixed-length
synthetic rows so every step sees the same tokens. ``8b`` is the 8B-class Llama of
make_llama8b.py built from its config with random weights (bf16, nothing to download);
``embedded`` is SmolLM2-135M. Tokens/s is timed from the end of the warm-up steps to the last
step. MFU counts the model FLOPs of LoRA training per token: forward 2N and input gradients 2N over
the N weights of the linear layers (frozen weights get no weight gradient), plus attention
12 * layers * hidden * seq (PaLM's convention, causal mask not discounted), over the peak dense
bf16 rate (``--peak-tflops``: 989 for H100/H200 SXM by the datasheet). Output: DIR/train_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _model_and_tokenizer(kind: str, dry_run: bool):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.base_model import materialize

    base = materialize().path
    tok = AutoTokenizer.from_pretrained(base)
    if kind == "embedded":
        from training.sft import load_model

        return load_model(base), tok
    from make_llama8b import LLAMA_8B

    spec = {k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    if dry_run:  # the same code path on a model a CPU trains in seconds
        spec.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64)
    config = LlamaConfig(**spec)
    dtype = torch.float32 if dry_run else torch.bfloat16
    device = "cpu" if dry_run else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random weights: throughput only
    return model, tok


def _flops_per_token(model, seq: int) -> float:
    """Model FLOPs of one LoRA training token (see the module docstring)."""
    import torch

    cfg = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return 4.0 * linear + attention


def worker(a: argparse.Namespace) -> None:
    """One rank: build the model, train ``a.steps`` steps, rank 0 writes the numbers."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from training.launch import process_state
    from training.lora import LoraSettings, TrainSettings, to_lora_config, trainer_kwargs

    ranks = process_state()
    model, tok = _model_and_tokenizer(a.model, a.cpu_dry_run)
    flops_per_token = _flops_per_token(model, a.seq)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(100, tok.vocab_size - 1, (a.batch * a.steps * ranks.num_processes + 8, a.seq), generator=g)
    ds = Dataset.from_dict({"input_ids": rows.tolist()})
    train = TrainSettings(max_steps=a.steps, batch_size=a.batch, max_length=a.seq, learning_rate=1e-4,
                          logging_steps=max(1, a.steps), gradient_checkpointing=a.grad_ckpt)
    kwargs = trainer_kwargs(train, Path(a.out) / "trainer")
    if a.cpu_dry_run:
        kwargs.update(bf16=False, use_cpu=True)
    args = SFTConfig(**kwargs, packing=False, completion_only_loss=False, dataset_num_proc=None)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=to_lora_config(LoraSettings(rank=a.lora_rank, alpha=2 * a.lora_rank)),
                         callbacks=[Clock()])
    trainer.train()
    timed = stamps[a.warmup:]
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    tokens = steps * a.batch * a.seq * ranks.num_processes
    tok_s = tokens / seconds
    if ranks.is_main_process:
        peak = a.peak_tflops * 1e12 * ranks.num_processes
        out = {
            "model": a.model, "processes": ranks.num_processes, "batch_per_process": a.batch, "seq": a.seq,
            "lora_rank": a.lora_rank, "gradient_checkpointing": a.grad_ckpt, "timed_steps": steps,
            "seconds": round(seconds, 3), "tokens_per_s": round(tok_s, 1),
            "flops_per_token": flops_per_token, "mfu": round(tok_s * flops_per_token / peak, 4),
            "peak_tflops_per_gpu": a.peak_tflops,
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
        }
        Path(a.result).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=["8b", "embedded"], default="8b")
    ap.add_argument("--gpus", default="1,2", help="process counts to run, one GPU each")
    ap.add_argument("--devices", default="0,1", help="physical GPUs to use, the first N for N processes")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2, help="rows per process per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from training.launch import LaunchSettings, accelerate_command
    from training.procs import run_owned

    if a.cpu_dry_run:
        a.gpus, a.steps, a.warmup, a.batch, a.seq = "1", 4, 1, 2, 64
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "train_scaling.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    for n in [int(x) for x in a.gpus.split(",")]:
        key = f"{a.model}-{n}gpu" + ("-ckpt" if a.grad_ckpt else "") + ("-cpu" if a.cpu_dry_run else "")
        result = out / f"{key}.json"
        target = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--out", str(out / key),
                  "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
                  "--seq", str(a.seq), "--lora-rank", str(a.lora_rank), "--peak-tflops", str(a.peak_tflops)]
        target += (["--grad-ckpt"] if a.grad_ckpt else []) + (["--cpu-dry-run"] if a.cpu_dry_run else [])
        cmd = accelerate_command(LaunchSettings(), n, gpu=not a.cpu_dry_run, target=target)
        env = {**os.environ, "TQDM_DISABLE": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        if not a.cpu_dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(a.devices.split(",")[:n])
        t0 = time.monotonic()
        code = run_owned(cmd, env=env, cwd=ROOT)
        entry = json.loads(result.read_text()) if code == 0 and result.is_file() else {"error": f"exit {code}"}
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        summary[key] = entry
        summary_file.write_text(json.dumps(summary, indent=1))
        print(f"RESULT {key}: {json.dumps(entry)}", flush=True)
    one, two = summary.get(f"{a.model}-1gpu", {}), summary.get(f"{a.model}-2gpu", {})
    if one.get("tokens_per_s") and two.get("tokens_per_s"):
        summary[f"{a.model}-scaling-2v1"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        summary_file.write_text(json.dumps(summary, indent=1))
        print(f"RESULT scaling 2 vs 1 GPU: {summary[f'{a.model}-scaling-2v1']}x", flush=True)


if __name__ == "__main__":
    main()
