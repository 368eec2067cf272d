#!/usr/bin/env bash
# The whole loop on a GPU box, as docs/GPU.md's runbook does it, timed:
#   1. `alignloop serve --config configs/serve-gpu.yaml` (gateway + the embedded model live),
#      started in its own session so it keeps serving between invocations of this script;
#   2. demo traffic with SIMULATED users (`alignloop data simulate --config configs/demo.yaml`), once;
#   3. `alignloop run --config configs/loop-gpu.yaml` (resumes the same window when run again);
#   4. benchmarks/gpu/loop_report.py: stage times, releases (placement, kernel), decision.
#
#   bash benchmarks/gpu/loop_gpu.sh OUT_DIR            (repo root; LOOP_BUDGET_S caps step 3)
#
# Environment: ALIGNLOOP (the CLI, default .venv/bin/alignloop), ALIGNLOOP_HOME (data dir),
# SERVE_CONFIG / LOOP_CONFIG / LOOP_OVERRIDES (a CPU dry run uses the CPU configs), LOOP_DEADLINE
# (epoch seconds: step 3 stops in time to report; a later invocation resumes the same window).
set -uo pipefail
out=${1:?usage: loop_gpu.sh OUT_DIR}
mkdir -p "$out"
export ALIGNLOOP_HOME=${ALIGNLOOP_HOME:-$PWD/.alignloop}
export ALIGNLOOP_ADMIN_KEY=${ALIGNLOOP_ADMIN_KEY:-sk-alignloop-admin}  # the DEMO admin key
mkdir -p "$ALIGNLOOP_HOME"
al=${ALIGNLOOP:-.venv/bin/alignloop}
py=$(dirname "$al")/python
serve_cfg=${SERVE_CONFIG:-configs/serve-gpu.yaml}
loop_cfg=${LOOP_CONFIG:-configs/loop-gpu.yaml}
timings=$ALIGNLOOP_HOME/loop-gpu-timings.jsonl
record() { echo "{\"phase\": \"$1\", \"seconds\": $2, \"exit\": ${3:-0}}" >> "$timings"; }
now() { date +%s.%N; }
since() { "$py" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$1"; }
healthy() { "$py" -c "
import sys, json, httpx
from serving.control.server import running_server
info = running_server()
sys.exit(0 if info and httpx.get(info['url'] + '/healthz', timeout=3).status_code == 200 else 1)" 2>/dev/null; }

if ! healthy; then
  t=$(now)
  setsid nohup "$al" serve --config "$serve_cfg" >> "$ALIGNLOOP_HOME/serve.log" 2>&1 < /dev/null &
  wait_s=600; [ -n "${LOOP_DEADLINE:-}" ] && wait_s=$(( LOOP_DEADLINE - $(date +%s) - 30 ))
  for _ in $(seq "$wait_s"); do healthy && break; sleep 1; done  # a gateway that never comes up ends the step in time
  healthy || { echo "gateway did not come up:"; tail -40 "$ALIGNLOOP_HOME/serve.log"; exit 1; }
  record "gateway + live release" "$(since "$t")"
fi
if [ ! -f "$ALIGNLOOP_HOME/traffic.json" ]; then
  t=$(now)
  "$al" data simulate --config configs/demo.yaml > "$ALIGNLOOP_HOME/traffic.json.tmp" \
    && mv "$ALIGNLOOP_HOME/traffic.json.tmp" "$ALIGNLOOP_HOME/traffic.json"
  record "demo traffic + simulated feedback" "$(since "$t")" $?
fi
code=0
if [ -n "${FORCE_RUN:-}" ] || ! ls "$ALIGNLOOP_HOME"/runs/*/loop-result.json > /dev/null 2>&1; then
  t=$(now)
  budget=${LOOP_BUDGET_S:-3600}
  [ -n "${LOOP_DEADLINE:-}" ] && budget=$(( LOOP_DEADLINE - $(date +%s) - 30 ))  # 30 s for the report
  # shellcheck disable=SC2086
  timeout "$budget" "$al" run --config "$loop_cfg" ${LOOP_OVERRIDES:-} >> "$out/loop-run.log" 2>&1
  code=$?
  record "alignloop run" "$(since "$t")" "$code"
  tail -25 "$out/loop-run.log"
else
  echo "the loop already finished a run here (FORCE_RUN=1 runs the next window)"
fi
"$py" benchmarks/gpu/loop_report.py "$ALIGNLOOP_HOME" --json "$out/loop_gpu.json" | tee "$out/loop_gpu.md"
exit "$code"
