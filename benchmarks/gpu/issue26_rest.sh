#!/usr/bin/env bash
# Issue 26's remaining GPU numbers on one lent GPU, one plan that runs detached
# (`lease.sh job benchmarks/gpu/issue26_rest.sh`, then `lease.sh jobwait SECONDS OUT` calls):
#   1. LoRA training MFU of the 8B-class config (random weights) with the loop's GPU stage settings
#      (configs/loop-gpu.yaml over sft.yaml / dpo.yaml) and TRL's speed features, one at a time:
#      Liger kernels, LoRA dropout off, batch sized to the card's memory, padding-free packing; SFT, then DPO.
#   2. The 8B config served per (scheme, kernel) through the gateway as `alignloop serve` runs it
#      (worker processes), beside direct vLLM; bf16 also through a gateway with no guardrails.
# Each step has its own time limit and writes under R as soon as it ends, so a lease cut short
# keeps what finished. From the repo root with the envs installed (lease.sh sets PATH and
# ALIGNLOOP_HOME); the embedded model's tokenizer must be materialized (or carried) already.
#
#   bash benchmarks/gpu/issue26_rest.sh R [train|perf|all]
set -uo pipefail
R=${1:?results dir}; what=${2:-all}
mkdir -p "$R"; R=$(cd "$R" && pwd)
py=${PY:-python}
log() { echo "[plan $(date +%H:%M:%S)] $*"; }
models=${ALIGNLOOP_HOME:-.alignloop}/llama8b
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/nvidia-smi.txt" 2>&1
"$py" -c "import importlib.util as u; print('liger_kernel', u.find_spec('liger_kernel') is not None)" > "$R/env.txt" 2>&1
"$py" -m pip freeze 2>/dev/null | grep -i -E "^(torch|transformers|trl|peft|accelerate|liger|triton)" >> "$R/env.txt"

train() {  # train TAG LIMIT_S ARGS...: one train_scaling.py run (its key: 8b-METHOD-1gpu-TAG)
  local tag=$1 limit=$2; shift 2
  log "train $tag: $*"
  timeout "$limit" "$py" benchmarks/gpu/train_scaling.py --out "$R/train" --model 8b --gpus 1 --devices 0 \
    --tag "$tag" "$@" >> "$R/train.log" 2>&1
  log "train $tag exit $? $(grep -h "RESULT 8b-[a-z]*-1gpu-$tag:" "$R/train.log" | tail -1 \
    | grep -o '"tokens_per_s": [0-9.]*\|"mfu": [0-9.]*\|"max_memory_gib": [0-9.]*\|"error": "[^"]*"' | tr '\n' ' ')"
}
mem() {  # peak GiB of a finished run, 0 if none
  "$py" -c "import json,sys; print(json.load(open('$R/train/train_scaling.json')).get(sys.argv[1], {}).get('max_memory_gib') or 0)" "$1" 2>/dev/null || echo 0
}
fit() {  # fit GIB_AT_B B: the largest batch whose peak stays under 90% of the card (linear in rows)
  "$py" -c "
import re, sys
m, b = float(sys.argv[1]), int(sys.argv[2])
mib = re.findall(r'(\d+) MiB', open(sys.argv[3]).read())
cap = 0.9 * int(mib[0]) / 1024 if mib else 72.0
weights = 15.6  # 8B bf16 weights + LoRA state, GiB
per = max((m - weights) / b, 0.5)
print(max(1, min(16, int((cap - weights) // per))) if m else b)" "$1" "$2" "$R/nvidia-smi.txt"
}

# train.liger_kernel is off by default until measured: null = on when liger-kernel is installed
# (the plan carries its wheel); the *-base runs set it false.
S="--steps 16 --warmup 4 --seq 2048 --set train.liger_kernel=null"
b=2
if [ "$what" != perf ]; then
  # SFT, fixed 2048-token rows (the loop's LoRA: r8 all-linear): the stage as shipped before, then
  # with Liger and LoRA dropout off, then the batch the card's memory takes
  train sft-b2-base 150 --method sft $S --batch 2 --set train.liger_kernel=false --set lora.dropout=0.05
  train sft-b2-liger-nodrop 150 --method sft $S --batch 2 --set lora.dropout=0
  b=$(fit "$(mem 8b-sft-1gpu-sft-b2-liger-nodrop)" 2); echo "$b" > "$R/sft_batch_fit.txt"
  [ "$b" -gt 2 ] && train "sft-b$b-liger-nodrop" 180 --method sft $S --batch "$b" --set lora.dropout=0
  # DPO: pairs of two 2048-token rows (prompt 512 + completion 1536), reference = adapter disabled
  train dpo-b1-liger 150 --method dpo $S --batch 1
  bd=$(fit "$(mem 8b-dpo-1gpu-dpo-b1-liger)" 1); echo "$bd" > "$R/dpo_batch_fit.txt"
  [ "$bd" -gt 1 ] && train "dpo-b$bd-liger" 180 --method dpo $S --batch "$bd"
  # varied row lengths: padding-free BFD packing (what the loop's packing: true does) vs padded batches
  train sft-varied-packed 180 --method sft --steps 20 --warmup 4 --seq 2048 --lengths varied --batch "$b" \
    --set train.liger_kernel=null --set lora.dropout=0 --set packing=true
fi

if [ "$what" != train ]; then
  if [ ! -d "$models/bf16" ]; then
    base=$("$py" -c "from training.base_model import materialize; print(materialize().path)")
    "$py" benchmarks/gpu/make_llama8b.py "$models" "$base" > /dev/null
  fi
  [ -s "$R/bw.json" ] || timeout 60 "$py" benchmarks/gpu/bandwidth.py > "$R/bw.json" 2> "$R/bw.log"
  for v in bf16 w4a16-marlin fp8-dynamic w4a16; do  # bf16 (the baseline), then the likely choices at c=1 and c=256
    log "perf $v"
    timeout 360 "$py" benchmarks/gpu/perf_8b.py --models "$models" --out "$R/perf" --variants "$v" \
      --concurrency 1,256 --noguard-variants "${NOGUARD:-}" >> "$R/perf.log" 2>&1
    log "perf $v exit $? $(grep -h "^RESULT $v:" "$R/perf.log" | tail -1)"
  done
  cp "$R/nvidia-smi.txt" "$R/perf/" 2>/dev/null
fi

if [ "$what" != perf ]; then
  # DPO without Liger; the same varied rows in padded batches (what packing saves); exploratory, the packed rows with flex attention (skips the masked blocks sdpa computes over
  # the flattened batch; padded to one shape so its kernel compiles once)
  b=$(cat "$R/sft_batch_fit.txt" 2>/dev/null || echo 2)
  train dpo-b1-base 150 --method dpo $S --batch 1 --set train.liger_kernel=false
  train sft-varied-padded 180 --method sft --steps 20 --warmup 4 --seq 2048 --lengths varied --batch "$b" \
    --set train.liger_kernel=null --set lora.dropout=0 --set packing=false
  train sft-varied-packed-flex 200 --method sft --steps 20 --warmup 6 --seq 2048 --lengths varied --batch "$b" \
    --set train.liger_kernel=null --set lora.dropout=0 --set packing=true --attn flex_attention --pad-multiple $(( b * 2048 ))
fi
"$py" benchmarks/gpu/summarize.py "$R" "$R/perf" "$R/train" > "$R/summary.md" 2>&1
log "plan done"
