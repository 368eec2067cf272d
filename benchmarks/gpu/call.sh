#!/usr/bin/env bash
# One device call's work, from the repo root on the GPU machine (after the parts are in /tmp/parts):
#   bash benchmarks/gpu/call.sh A   install + env check + copy bandwidth + perf bf16, w4a16 (Machete)
#   bash benchmarks/gpu/call.sh B   perf w4a16-marlin, fp8-dynamic + gateway at concurrency 256
#   bash benchmarks/gpu/call.sh T   SFT -> DPO -> merge -> AWQ w4a16 + FP8, quality of all four variants
#   bash benchmarks/gpu/call.sh Q   quality of the quantized variants again (when T ran out of time)
# Results accumulate in /tmp/results (kept while the machine stays warm) and are copied to $OUT.
set -uo pipefail
phase=$1; budget=${BUDGET_S:-540}
R=/tmp/results; mkdir -p "$R"
finish() {
  cp "$R"/*.json "$OUT"/ 2>/dev/null
  (cd "$R" && find work -name '*.log' -o -name 'result.json' -o -name 'metrics.json' \
     -o -name '*.jsonl' | tar czf "$OUT/logs-$phase.tgz" -T - 2>/dev/null)
  ls -la "$OUT"
}
trap finish EXIT
if [ "$phase" = A ] && [ ! -x /tmp/serve-python ]; then
  bash benchmarks/gpu/device_install.sh || exit 1
fi
# Missed by ../shared/gpu/vllm-gpu-wheels.txt (the offline LLM engine never imports them):
# jmespath (vLLM's api_server -> model_hosting_container_standards) and orjson (the gateway).
for w in .gpu/fix/*.whl; do [ -f "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
[ -x /tmp/serve-python ] || { echo "not installed: run phase A first"; exit 1; }
source benchmarks/gpu/device_env.sh
if [ "$phase" = A ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$R/nvidia-smi.txt"
  python3 benchmarks/gpu/check_env.py | tee "$R/env.json" &
  /tmp/serve-python -c "import vllm, json; print(json.dumps({'vllm': vllm.__version__}))" | tee "$R/vllm.json" &
  wait
  python3 benchmarks/gpu/bandwidth.py | tee "$R/bw.json"
fi
M=/tmp/b/models/llama8b
case "$phase" in
  A) timeout $((budget - 60)) python3 benchmarks/gpu/perf_8b.py --models $M --out $R --variants bf16,w4a16 ;;
  B) timeout $budget python3 benchmarks/gpu/perf_8b.py --models $M --out $R --variants w4a16-marlin,fp8-dynamic --gateway ;;
  T) timeout $budget python3 benchmarks/gpu/train_quality.py --dataset /tmp/b/data/run/data/output/dataset \
       --out $R --run-dir /tmp/alrun --quality-variants base,aligned,aligned-w4a16,aligned-fp8-dynamic ;;
  Q) timeout $budget python3 benchmarks/gpu/train_quality.py --dataset /tmp/b/data/run/data/output/dataset \
       --out $R --run-dir /tmp/alrun --stages quality --quality-variants aligned-w4a16,aligned-fp8-dynamic ;;
esac
echo "phase $phase exit $?"
