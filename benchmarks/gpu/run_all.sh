#!/usr/bin/env bash
# Every GPU number of BENCHMARKS.md on a box with 2 GPUs, in steps of under 10 minutes (a machine
# lent by the hour, a CI job with a time limit): independent work runs on the two GPUs at once,
# and a step redoes only what earlier steps did not finish.
#
#   bash benchmarks/gpu/run_all.sh 1 OUT   GPU 0: the loop (loop_gpu.sh, resumable)
#                                          GPU 1: copy bandwidth; 8B perf bf16, w4a16-marlin, fp8-dynamic
#   bash benchmarks/gpu/run_all.sh 2 OUT   GPU 0: the loop again (resumes where step 1 stopped)
#                                          GPU 1: the 8B variants still missing, then w4a16 (Machete);
#                                          LoRA training on 1 GPU (MFU)
#                                          then both GPUs, once the loop is done (its gateway is
#                                          stopped): training on 2 GPUs (DDP scaling), vLLM TP=2
#   bash benchmarks/gpu/run_all.sh 3 OUT   both GPUs: what is still missing of the above, vLLM DP=2
#
# On a box with ONE GPU the same steps run one after the other on GPU 0: step 1 the loop; step 2
# (once the loop is done and its gateway stopped) the gateway's cost at GPU speed, the 8B perf
# variants, LoRA training on 1 GPU; step 3 what is still missing. The 2-GPU runs are skipped and
# the summary says so. Step 2 also runs the gateway benchmark (benchmarks/gateway_bench.py: direct
# vs gateway with and without guardrails, the product gateway with worker processes).
#
# From the repo root with the environments set up (docs/GPU.md). STEP_S caps a step (default 570
# s). Each step writes OUT/summary.md, OUT/results-STEP.tgz (JSON, markdown, logs) and
# OUT/loop-runs-STEP.tgz (the loop's result files, release records and report).
set -uo pipefail
step=${1:?step 1, 2 or 3}; out=${2:?OUT dir}
mkdir -p "$out"; out=$(cd "$out" && pwd)
export ALIGNLOOP_HOME=${ALIGNLOOP_HOME:-$PWD/.alignloop} PYTHONUNBUFFERED=1
py=${PY:-.venv/bin/python}
deadline=$(( $(date +%s) + ${STEP_S:-570} - 25 ))  # 25 s kept for packing the results
left() { echo $(( deadline - $(date +%s) )); }
models=$ALIGNLOOP_HOME/llama8b
log() { echo "[run_all $(date +%H:%M:%S)] $*"; }
missing() {  # the perf labels (args) without a result in OUT/perf/perf_8b.json, comma-separated
  "$py" - "$out/perf/perf_8b.json" "$@" <<'PY'
import json, sys
try:
    got = json.load(open(sys.argv[1]))["variants"]
except (OSError, ValueError, KeyError):
    got = {}
print(",".join(v for v in sys.argv[2:] if "gateway" not in got.get(v, {}) and "direct" not in got.get(v, {})))
PY
}
trained() { "$py" -c "import json,sys; sys.exit(0 if json.load(open('$out/train/train_scaling.json')).get('$1', {}).get('tokens_per_s') else 1)" 2>/dev/null; }
perf() { timeout "$(left)" "$py" benchmarks/gpu/perf_8b.py --models "$models" --out "$out/perf" --concurrency 1,256 "$@"; }

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gateway_gpu() {  # the gateway's cost in front of the 8B model (issue: gateway at GPU speed)
  [ -s "$out/gateway-gpu.json" ] || timeout "$(left)" "$py" benchmarks/gateway_bench.py \
    --model "$models/bf16" --gpu --vllm-arg=--load-format --vllm-arg=dummy --concurrency 1 256 \
    --input-len 128 --output-len 256 --prompts-per-level 2 --min-prompts 16 --workers 4 \
    --out "$out/gateway-gpu.json" > "$out/gateway-gpu.log" 2>&1
}

gpu1() {  # the jobs of GPU 1 in this step (GPU 0 on a one-GPU box), one after the other
  export CUDA_VISIBLE_DEVICES=$(( ngpu > 1 ? 1 : 0 ))
  if [ "$step" = 1 ]; then
    "$py" benchmarks/gpu/bandwidth.py > "$out/bw.json"
    perf --variants bf16,w4a16-marlin,fp8-dynamic
  else
    gateway_gpu
    trained 8b-sft-1gpu || timeout "$(left)" "$py" benchmarks/gpu/train_scaling.py --out "$out/train" --model 8b \
      --gpus 1 --devices "$CUDA_VISIBLE_DEVICES"
    todo=$(missing bf16 w4a16-marlin fp8-dynamic w4a16)
    [ -n "$todo" ] && perf --variants "$todo"
  fi
}

both_gpus() {  # the runs that need both GPUs, each only if it has no result yet
  trained 8b-sft-2gpu || timeout "$(left)" "$py" benchmarks/gpu/train_scaling.py --out "$out/train" --model 8b \
    --gpus 2 --devices 0,1 > "$out/train2.log" 2>&1
  [ -n "$(missing bf16-tp2)" ] && perf --variants bf16 --tensor-parallel 2 > "$out/tp2.log" 2>&1
  [ "$step" = 3 ] && [ -n "$(missing bf16-dp2)" ] && perf --variants bf16 --data-parallel 2 > "$out/dp2.log" 2>&1
  return 0
}

if [ "$step" = 1 ]; then
  base=$("$py" -c "from training.base_model import materialize; print(materialize().path)") || exit 1
  [ -d "$models/bf16" ] || "$py" benchmarks/gpu/make_llama8b.py "$models" "$base" > /dev/null
fi
loop_finished() { [ -f "$out/loop/loop_gpu.json" ] && "$py" -c "import json,sys; sys.exit(0 if json.load(open('$out/loop/loop_gpu.json')).get('result') else 1)"; }
stop_loop_gateway() {  # the loop's `alignloop serve` holds GPU 0's live release
  pid=$("$py" -c "import json; print(json.load(open('$ALIGNLOOP_HOME/server.json'))['pid'])" 2>/dev/null) \
    && kill -TERM "$pid" && while kill -0 "$pid" 2>/dev/null; do sleep 1; done
  return 0
}
if [ "$ngpu" = 1 ]; then
  log "one GPU: the steps run one after the other on GPU 0; the 2-GPU runs are skipped"
  if ! loop_finished; then
    (CUDA_VISIBLE_DEVICES=0 LOOP_DEADLINE=$deadline bash benchmarks/gpu/loop_gpu.sh "$out/loop" >> "$out/loop.log" 2>&1)
    log "loop exit $?"
  fi
  if [ "$step" != 1 ] && loop_finished; then
    stop_loop_gateway
    [ "$step" = 3 ] && step=2  # step 3 on one GPU: whatever step 2 left
    gpu1 >> "$out/gpu1.log" 2>&1
    log "GPU 0 done (gateway cost, 8B perf, 1-GPU training)"
  fi
  echo "2-GPU runs (DDP scaling, TP=2, DP=2): not run, this box has one GPU" > "$out/two-gpu-skipped.txt"
elif [ "$step" != 3 ]; then
  log "GPU 0: the loop; GPU 1: 8B perf$( [ "$step" = 2 ] && echo ' + 1-GPU training' )"
  (CUDA_VISIBLE_DEVICES=0 LOOP_DEADLINE=$deadline bash benchmarks/gpu/loop_gpu.sh "$out/loop" >> "$out/loop.log" 2>&1) &
  loop_pid=$!
  gpu1 >> "$out/gpu1.log" 2>&1 &
  gpu1_pid=$!
  wait "$gpu1_pid"; log "GPU 1 done"
  wait "$loop_pid"; log "loop exit $?"
fi
if [ "$ngpu" = 1 ]; then
  :
elif [ "$step" != 1 ] && loop_finished; then
  stop_loop_gateway  # frees GPU 0
  log "both GPUs: 2-GPU training, TP=2$( [ "$step" = 3 ] && echo ', DP=2' )"
  both_gpus
elif [ "$step" != 1 ]; then
  log "the loop has not finished: run step 2 again before the 2-GPU part"
fi
"$py" benchmarks/gpu/summarize.py "$out" "$out/perf" "$out/train" "$out/loop" > "$out/summary.md" 2>&1
(cd "$out" && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.jsonl' \) \
   -size -8M ! -path './results-*' | tar czf "results-$step.tgz" -T -)
(cd "$ALIGNLOOP_HOME" && find runs releases \( -name 'result.json' -o -name 'release.json' -o -name '*.md' \
   -o -name 'loop-result.json' -o -name 'gate.json' -o -name '*.log' \) -size -4M | tar czf "$out/loop-runs-$step.tgz" -T - 2>/dev/null)
log "done: $out/summary.md, $out/results-$step.tgz"
cat "$out/summary.md"
