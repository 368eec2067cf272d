#!/usr/bin/env bash
# The loop on a lent GPU machine that starts bare, keeps nothing after 30 s idle and takes one
# bundle part per call (docs/GPU.md, "On a short lease"). Each step is one short call, run from
# the checkout the call brings; everything it keeps goes outside that checkout (under $LEASE,
# default /root/lease), so a later call refreshing the checkout never touches a running loop.
#
#   bash benchmarks/gpu/lease.sh part DIR        move the one bundle part carried in DIR out of the
#                                                checkout (a later call replaces carried paths)
#   bash benchmarks/gpu/lease.sh install         join the parts, install both envs (offline/install.sh)
#                                                into $LEASE/env for a copy of the checkout in $LEASE/repo
#   bash benchmarks/gpu/lease.sh start           refresh $LEASE/repo from this call's checkout, then
#                                                loop_gpu.sh in its own session (survives the call),
#                                                data dir $LEASE/home, log $LEASE/out; a second start
#                                                after a failure resumes the same data window
#   bash benchmarks/gpu/lease.sh wait SECONDS [OUT]   wait until the loop ends or SECONDS pass, then pack
#                                                what it wrote so far (small files) into OUT
#   bash benchmarks/gpu/lease.sh pack OUT        the results only: OUT/results.tgz, the log tails
#   bash benchmarks/gpu/lease.sh job SCRIPT      any other benchmark plan (a bash script taking a results
#                                                dir) in its own session, from $LEASE/repo with the
#                                                installed envs; results in $LEASE/job, log $LEASE/job/job.log
#   bash benchmarks/gpu/lease.sh jobwait SECONDS OUT   wait until that job ends or SECONDS pass, then copy
#                                                its small files (< 2 MB) into OUT
#
# The run's per-item outcomes, gate, report, stage results and release records travel in
# results.tgz (run folder files under 2 MB, no datasets, weights or databases).
set -uo pipefail
lease=${LEASE:-/root/lease}
here=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$lease/parts" "$lease/out"

sync_repo() {  # this call's checkout over the copy the loop runs from (a fix made between calls)
  mkdir -p "$lease/repo" && tar -C "$here" --exclude=./.bundle -cf - . | tar -C "$lease/repo" -xf -
}

running() { [ -f "$lease/loop.pid" ] && kill -0 "$(cat "$lease/loop.pid")" 2>/dev/null; }
job_running() { [ -f "$lease/job.pid" ] && kill -0 "$(cat "$lease/job.pid")" 2>/dev/null; }

pack() {
  local out=${1:?pack OUT}
  mkdir -p "$out"
  local home=$lease/home
  if [ -d "$home" ]; then
    (cd "$home" && find runs releases loop-state.json loop-gpu-timings.jsonl -type f -size -2M \
        ! -name '*.arrow' ! -name '*.db' ! -name '*.safetensors' ! -name '*.png' ! -name '*.bin' \
        2>/dev/null | tar -czf "$out/results.tgz" -T -)
    tail -c 200000 "$home/serve.log" > "$out/serve.log" 2>/dev/null
  fi
  tail -c 400000 "$lease/out/loop-run.log" > "$out/loop-run.log" 2>/dev/null
  cp "$lease/out/lease.log" "$lease/out/loop_gpu.md" "$lease/out/loop_gpu.json" "$out/" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv > "$out/gpu.csv" 2>/dev/null
  true
}

case ${1:-} in
  part)
    src=${2:?part DIR}
    mv "$src"/p[0-9]* "$lease/parts/" && ls -l "$lease/parts" ;;
  install)
    t0=$(date +%s)
    sync_repo
    cat "$lease"/parts/p[0-9]* | tar -x -C "$lease" || exit 1
    bash "$lease/repo/offline/install.sh" "$lease/bundle" --prefix "$lease/env" || exit 1
    echo "joined and installed in $(( $(date +%s) - t0 )) s" ;;
  start)
    running && { echo "the loop already runs (pid $(cat "$lease/loop.pid"))"; exit 0; }
    sync_repo; cd "$lease/repo" || exit 1
    export ALIGNLOOP_HOME=$lease/home ALIGNLOOP=$lease/env/.venv/bin/alignloop \
      ALIGNLOOP_SERVE_PYTHON=$lease/env/.venv-serve/bin/python PATH=$lease/env/.venv/bin:$PATH \
      PYTHONUNBUFFERED=1
    setsid nohup bash -c "echo \$\$ > '$lease/loop.pid'; t=\$(date +%s); bash benchmarks/gpu/loop_gpu.sh '$lease/out'; \
      echo \"loop_gpu.sh exit \$? after \$(( \$(date +%s) - t )) s\"" \
      >> "$lease/out/lease.log" 2>&1 < /dev/null &
    sleep 1
    echo "started loop_gpu.sh (pid $(cat "$lease/loop.pid")), data dir $ALIGNLOOP_HOME" ;;
  wait)
    deadline=$(( $(date +%s) + ${2:?wait SECONDS [OUT]} ))
    while running && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    running && echo "still running" || echo "finished"
    grep -v "HTTP Request" "$lease/out/lease.log" 2>/dev/null | tail -5   # loop_gpu.sh's own lines, not the traffic's
    grep -E "sft step|dpo step|Finished in state|decision|staged|evaluat" "$lease/out/loop-run.log" 2>/dev/null | tail -15
    [ -n "${3:-}" ] && pack "$3" ;;
  pack)
    pack "${2:?pack OUT}" ;;
  job)
    script=${2:?job SCRIPT}
    job_running && { echo "a job already runs (pid $(cat "$lease/job.pid"))"; exit 0; }
    sync_repo; cd "$lease/repo" || exit 1
    mkdir -p "$lease/job"
    export ALIGNLOOP_HOME=$lease/home ALIGNLOOP=$lease/env/.venv/bin/alignloop \
      ALIGNLOOP_SERVE_PYTHON=$lease/env/.venv-serve/bin/python PATH=$lease/env/.venv/bin:$PATH \
      PYTHONUNBUFFERED=1 LEASE=$lease
    setsid nohup bash -c "echo \$\$ > '$lease/job.pid'; t=\$(date +%s); bash '$script' '$lease/job'; \
      echo \"job exit \$? after \$(( \$(date +%s) - t )) s\"" >> "$lease/job/job.log" 2>&1 < /dev/null &
    sleep 1
    echo "started $script (pid $(cat "$lease/job.pid")), results in $lease/job" ;;
  jobwait)
    deadline=$(( $(date +%s) + ${2:?jobwait SECONDS OUT} ))
    copy_job() {  # what the job wrote so far (also every 30 s: a call cut short keeps it)
      [ -n "${3:-}" ] || return 0
      mkdir -p "$3"
      (cd "$lease/job" && find . -type f -size -2M ! -name '*.safetensors' ! -name '*.db' ! -name '*.bin' \
        | tar -cf - -T - | tar -C "$3" -xf -)
    }
    n=0
    while job_running && [ "$(date +%s)" -lt "$deadline" ]; do
      sleep 3; n=$((n + 1)); [ $((n % 10)) = 0 ] && copy_job "$@"
    done
    job_running && echo "still running" || echo "finished"
    grep -E "^\[|RESULT|job exit" "$lease/job/job.log" 2>/dev/null | tail -25
    copy_job "$@"
    [ -n "${3:-}" ] && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv > "$3/gpu.csv" 2>/dev/null
    true ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
