"""LoRA SFT and DPO throughput on 1 and 2 GPUs (DDP through `accelerate launch`) and training MFU.

    .venv/bin/python benchmarks/gpu/train_scaling.py --out DIR [--model 8b|embedded] [--method sft|dpo]
        [--gpus 1,2] [--batch 2] [--seq 2048] [--lengths fixed|varied] [--set KEY=VALUE ...] [--tag NAME]
    .venv/bin/python benchmarks/gpu/train_scaling.py --out DIR --cpu-dry-run [--method dpo]   (mechanics, on a CPU)

For each process count the script launches itself with the command the product's training
launcher builds (:func:`training.launch.accelerate_command`, DDP), and each rank trains a LoRA
with TRL's SFTTrainer or DPOTrainer configured by the stage's own mapping (``to_trl_config``,
:func:`training.lora.to_lora_config`) from the settings the loop uses: ``--loop-config``'s section
for the stage (default configs/loop-gpu.yaml over configs/sft.yaml / dpo.yaml: LoRA, packing,
Liger kernels), then ``--set`` overrides, then this benchmark's shape (steps, rows per step, row
length). Rows are synthetic token ids: ``fixed`` = every row ``--seq`` tokens; ``varied`` =
lengths uniform in [seq/8, seq], where padding-free packing (``packing: true``) matters. DPO rows
are a prompt of a quarter of the row and two completions of the rest (the reference is the model
with the adapter disabled, as in the stage). ``8b`` is the 8B-class Llama of make_llama8b.py built
from its config with random weights (bf16, nothing to download); ``embedded`` is SmolLM2-135M.
Tokens/s (real tokens, padding not counted) is timed from the end of the warm-up steps to the
last step. MFU counts the model FLOPs of LoRA training (:func:`model_flops`: forward 2N and input
gradients 2N over the frozen linear weights, the output head only at the positions TRL's fused
head scores, attention 12 * layers * hidden * row length per token, PaLM's convention; DPO adds
the reference forward) over the peak dense bf16 rate (``--peak-tflops``: 989 for H100/H200 SXM by
the datasheet). Output: DIR/train_scaling.json (one key per run) and DIR/<key>.json.
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


def _model_and_tokenizer(kind: str, dry_run: bool, attn: str | None = None):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.base_model import materialize

    base = materialize().path
    tok = AutoTokenizer.from_pretrained(base)
    if kind == "embedded":
        from training.stage import load_model

        return load_model(base), tok
    from make_llama8b import LLAMA_8B

    spec = {k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    if dry_run:  # the same code path on a model a CPU trains in seconds
        spec.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64)
    config = LlamaConfig(**spec)
    if attn:  # sdpa by default; flex_attention skips the masked blocks of packed rows
        config._attn_implementation = attn
    dtype = torch.float32 if dry_run else torch.bfloat16
    device = "cpu" if dry_run else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random weights: throughput only
    return model, tok


def _linear_params(model) -> tuple[int, int]:
    """(weights of every frozen linear layer, of which the output head's)."""
    import torch

    linear = head = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in n:
            linear += m.weight.numel()
            if n.endswith("lm_head"):
                head += m.weight.numel()
    return linear, head


def model_flops(cfg, linear: int, head: int, lengths: list[int], scored: int, method: str) -> float:
    """Model FLOPs of one pass over rows of ``lengths`` tokens, ``scored`` of them through the output
    head (TRL's fused head projects only the positions with a label). LoRA training: forward 2N and
    input gradients 2N over the frozen linear weights (no weight gradient), attention
    12 * layers * hidden * row length per token (PaLM's convention, causal mask not discounted).
    DPO adds the reference forward (2N, attention 4 * layers * hidden * length) on the same rows."""
    body = linear - head
    tokens = sum(lengths)
    attn = sum(n * n for n in lengths) * cfg.num_hidden_layers * cfg.hidden_size
    flops = 4.0 * body * tokens + 4.0 * head * scored + 12.0 * attn
    if method == "dpo":
        flops += 2.0 * body * tokens + 2.0 * head * scored + 4.0 * attn
    return flops


def stage_config(a: argparse.Namespace):
    """The stage's config as the loop builds it (``--loop-config``'s section: the stage YAML with the
    loop's own section on top), then ``--set`` overrides, then this benchmark's shape (steps, rows
    per step, row length). Returns (stage config, the TRL config from the stage's own mapping)."""
    from flows.loop_config import load_loop_config
    from ground.config import build_config, merge_dicts, parse_overrides

    loop = load_loop_config(a.loop_config)
    section = loop.section(a.method)
    shape = {"train": {"max_steps": a.steps, "batch_size": a.batch, "max_length": a.seq, "grad_accum": 1,
                       "logging_steps": max(1, a.steps), "learning_rate": 1e-4}}
    if a.grad_ckpt:
        shape["train"]["gradient_checkpointing"] = True
    wired = {"dataset_path": "synthetic", "run_dir": str(Path(a.out) / "run")}
    if a.method == "dpo":
        from training.dpo import DPOStageConfig as cls
        from training.dpo import to_trl_config

        wired["sft_adapter"] = "synthetic"
    else:
        from training.sft import SFTStageConfig as cls
        from training.sft import to_trl_config
    data = merge_dicts(merge_dicts(merge_dicts(section, parse_overrides(a.set)), shape), wired)
    cfg = build_config(cls, data, f"{a.loop_config} section {a.method} + --set + shape")
    return cfg, to_trl_config(cfg, Path(a.out) / "trainer")


def synthetic_rows(a: argparse.Namespace, vocab: int, n: int) -> tuple[dict, list[int]]:
    """``n`` rows of random token ids and their lengths. ``fixed``: every row ``--seq`` tokens;
    ``varied``: lengths uniform in [seq/8, seq] (what padding-free packing is for). DPO: a prompt of
    a quarter of the row, chosen and rejected completions of the rest (each sequence one row)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if a.lengths == "fixed":
        lengths = [a.seq] * n
    else:
        lengths = torch.randint(a.seq // 8, a.seq + 1, (n,), generator=g).tolist()
    ids = [torch.randint(100, vocab - 1, (length,), generator=g).tolist() for length in lengths]
    if a.method == "dpo":
        cut = [length // 4 for length in lengths]
        other = [torch.randint(100, vocab - 1, (length,), generator=g).tolist() for length in lengths]
        return {"prompt_ids": [r[:c] for r, c in zip(ids, cut, strict=True)],
                "chosen_ids": [r[c:] for r, c in zip(ids, cut, strict=True)],
                "rejected_ids": [r[c:] for r, c in zip(other, cut, strict=True)]}, lengths
    return {"input_ids": ids}, lengths


def worker(a: argparse.Namespace) -> None:
    """One rank: build the model, train ``a.steps`` steps, rank 0 writes the numbers."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from training.launch import process_state
    from training.lora import to_lora_config

    ranks = process_state()
    cfg, args = stage_config(a)  # on a CPU trainer_kwargs already picks float32 and use_cpu
    if a.pad_multiple:  # one padded shape for every packed step (a compiled attention kernel compiles once)
        args.pad_to_multiple_of = a.pad_multiple
    model, tok = _model_and_tokenizer(a.model, a.cpu_dry_run, a.attn)
    linear, head = _linear_params(model)
    rows_needed = a.batch * a.steps * ranks.num_processes * (2 if a.lengths == "varied" else 1) + 8
    columns, lengths = synthetic_rows(a, tok.vocab_size, rows_needed)
    ds = Dataset.from_dict(columns)
    stamps: list[float] = []
    batches: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    common = dict(model=model, args=args, train_dataset=ds, processing_class=tok,
                  peft_config=to_lora_config(cfg.lora), callbacks=[Clock()])
    if a.method == "dpo":
        from trl import DPOTrainer

        # The rows are already token ids: skip TRL's tokenization of text prompts.
        prepare = DPOTrainer._prepare_dataset
        DPOTrainer._prepare_dataset = lambda self, d, *r, **k: d if "prompt_ids" in d.column_names else prepare(self, d, *r, **k)
        trainer = DPOTrainer(ref_model=None, **common)
    else:
        from trl import SFTTrainer

        trainer = SFTTrainer(**common)
    # What each step trains on, as the collator builds it: real tokens, rows, scored positions.
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        if a.method == "dpo":
            rows = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples]
            rows += [len(e["prompt_ids"]) + len(e["rejected_ids"]) for e in examples]
            scored = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
            batches.append({"lengths": rows, "scored": scored, "shape": list(batch["input_ids"].shape)})
        else:
            rows = [n for e in examples for n in (e.get("seq_lengths") or [len(e["input_ids"])])]
            batches.append({"lengths": rows, "scored": sum(rows) - len(rows),
                            "shape": list(batch["input_ids"].shape)})
        return batch

    trainer.data_collator = counting
    trainer.train()
    timed = stamps[a.warmup:]
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    # Steps warmup+1 .. end were timed; batches[i] is step i+1's (no prefetch: 0 loader workers).
    done = batches[a.warmup + 1: a.warmup + 1 + steps]
    tokens = sum(sum(b["lengths"]) for b in done) * ranks.num_processes
    flops = sum(model_flops(model.config, linear, head, b["lengths"], b["scored"], a.method) for b in done)
    flops *= ranks.num_processes
    padded = sum(b["shape"][0] * b["shape"][1] for b in done)
    if ranks.is_main_process:
        peak = a.peak_tflops * 1e12 * ranks.num_processes
        out = {
            "model": a.model, "method": a.method, "processes": ranks.num_processes, "batch_per_process": a.batch,
            "seq": a.seq, "lengths": a.lengths, "loop_config": a.loop_config, "set": a.set,
            "lora": cfg.lora.model_dump(), "packing": getattr(cfg, "packing", None),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "use_liger_kernel": bool(args.use_liger_kernel), "gradient_checkpointing": bool(args.gradient_checkpointing),
            "attn_implementation": model.config._attn_implementation, "pad_to_multiple_of": a.pad_multiple,
            "timed_steps": steps, "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "padding_share": round(1 - tokens / ranks.num_processes / padded, 4),
            "model_tflops": round(flops / 1e12, 2), "mfu": round(flops / seconds / peak, 4),
            "peak_tflops_per_gpu": a.peak_tflops,
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "step_shapes": [b["shape"] for b in done[:3]],
        }
        Path(a.result).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=["8b", "embedded"], default="8b")
    ap.add_argument("--method", choices=["sft", "dpo"], default="sft")
    ap.add_argument("--loop-config", default="configs/loop-gpu.yaml",
                    help="the loop config whose stage settings (LoRA, packing, Liger, ...) are trained with")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override on the stage's settings (lora.dropout=0.05, packing=false, train.liger_kernel=false)")
    ap.add_argument("--tag", default="", help="suffix of this run's key in train_scaling.json")
    ap.add_argument("--gpus", default="1,2", help="process counts to run, one GPU each")
    ap.add_argument("--devices", default="0,1", help="physical GPUs to use, the first N for N processes")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2, help="rows (SFT: packed rows; DPO: pairs) per process per step")
    ap.add_argument("--seq", type=int, default=2048, help="row length (the packing bin with --lengths varied)")
    ap.add_argument("--lengths", choices=["fixed", "varied"], default="fixed")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--attn", default=None, help="attention implementation of the 8b model (default: sdpa)")
    ap.add_argument("--pad-multiple", type=int, default=None, help="pad each step's rows to a multiple of this")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from ground.procs import run_owned
    from training.launch import LaunchSettings, accelerate_command

    if a.cpu_dry_run:
        a.gpus, a.steps, a.warmup, a.batch, a.seq = "1", 4, 1, 2, 64
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "train_scaling.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    for n in [int(x) for x in a.gpus.split(",")]:
        key = (f"{a.model}-{a.method}-{n}gpu" + ("-ckpt" if a.grad_ckpt else "") + (f"-{a.tag}" if a.tag else "")
               + ("-cpu" if a.cpu_dry_run else ""))
        result = out / f"{key}.json"
        target = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--out", str(out / key),
                  "--model", a.model, "--method", a.method, "--loop-config", a.loop_config, "--steps", str(a.steps),
                  "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq", str(a.seq), "--lengths", a.lengths,
                  "--peak-tflops", str(a.peak_tflops)]
        target += (["--attn", a.attn] if a.attn else []) + (["--pad-multiple", str(a.pad_multiple)] if a.pad_multiple else [])
        target += [f"--set={kv}" for kv in a.set]
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
        print(f"RESULT {key}: {json.dumps({k: v for k, v in entry.items() if k != 'lora'})}", flush=True)
    one, two = summary.get(f"{a.model}-{a.method}-1gpu", {}), summary.get(f"{a.model}-{a.method}-2gpu", {})
    if one.get("tokens_per_s") and two.get("tokens_per_s"):
        summary[f"{a.model}-{a.method}-scaling-2v1"] = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        summary_file.write_text(json.dumps(summary, indent=1))
        print(f"RESULT scaling 2 vs 1 GPU: {summary[f'{a.model}-{a.method}-scaling-2v1']}x", flush=True)


if __name__ == "__main__":
    main()
