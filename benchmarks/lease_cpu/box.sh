#!/usr/bin/env bash
# The lent machine's half of benchmarks/lease_cpu/pack.sh: the CPU demo on its processor, limited
# to two cores, as `make demo` runs it after `make setup` (prepare, then demo), each timed.
#
#   bash benchmarks/lease_cpu/box.sh part DIR       move the one part carried in DIR out of the
#                                                    checkout (a later call replaces carried paths)
#   bash benchmarks/lease_cpu/box.sh install         join, check, unpack to the packed paths
#   bash benchmarks/lease_cpu/box.sh start [CORES]   take all but CORES (default 2) processors
#                                                    offline, then prepare + demo in their own
#                                                    session (they outlive the call)
#   bash benchmarks/lease_cpu/box.sh wait SECONDS OUT   wait for the demo, copy its logs and the
#                                                    run's small files into OUT
#
# Everything it keeps is under $CB (default /root/cb) and at the packed absolute paths.
set -uo pipefail
cb=${CB:-/root/cb}
here=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$cb/parts"
running() { [ -f "$cb/demo.pid" ] && kill -0 "$(cat "$cb/demo.pid")" 2>/dev/null; }

case ${1:-} in
  part)
    mv "${2:?part DIR}"/p[0-9]* "$cb/parts/" && ls -l "$cb/parts" ;;
  install)
    t0=$(date +%s)
    read -r pyhome root ver < "$here/.cpubox/paths"
    want=$(cat "$here/.cpubox/SHA256")
    have=$(cat "$cb"/parts/p[0-9]* | sha256sum | cut -d' ' -f1)
    [ "$want" = "$have" ] || { echo "bundle sha256 $have, packed $want" >&2; exit 1; }
    rm -rf "$cb/x" && mkdir -p "$cb/x"
    cat "$cb"/parts/p[0-9]* | xz -d -T0 | tar -x -C "$cb/x" || exit 1
    mkdir -p "$(dirname "$pyhome")" "$root"
    rm -rf "$pyhome" && mv "$cb/x/${pyhome#/}" "$pyhome"
    for v in .venv .venv-serve; do rm -rf "${root:?}/$v" && mv "$cb/x/${root#/}/$v" "$root/$v"; done
    sp=lib/python$ver/site-packages
    ln -s "$root/.venv/$sp/torch" "$root/.venv-serve/$sp/torch"
    rm -rf "$root/.venv-serve/$sp"/triton-*.dist-info
    # The standard library's own libraries, only where this box lacks one.
    mkdir -p "$cb/fallback"
    for f in "$cb/x/lib/"*; do
      ldconfig -p | grep -q " $(basename "$f") " || { cp "$f" "$cb/fallback/"; echo "carried: $(basename "$f")"; }
    done
    [ "$here" = "$root" ] || { tar -C "$here" --exclude=./.cpubox -cf - . | tar -C "$root" -xf -; }
    LD_LIBRARY_PATH=$cb/fallback "$root/.venv/bin/python" -c "import sqlite3, ssl, lzma, torch; print('env ok', torch.__version__)"
    echo "installed in $(( $(date +%s) - t0 )) s" ;;
  start)
    running && { echo "already running"; exit 0; }
    read -r pyhome root ver < "$here/.cpubox/paths"
    [ "$here" = "$root" ] || { tar -C "$here" --exclude=./.cpubox -cf - . | tar -C "$root" -xf -; }
    keep=${2:-2}
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
      n=${c##*cpu}; [ "$n" -ge "$keep" ] && [ -w "$c/online" ] && echo 0 > "$c/online"
    done
    echo "processors online: $(nproc) ($(grep -c ^processor /proc/cpuinfo) in cpuinfo); $(grep -m1 'model name' /proc/cpuinfo)"
    grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    export ALIGNLOOP_HOME=$cb/home PREFECT_HOME=$cb/prefect LD_LIBRARY_PATH=$cb/fallback \
      PIP_NO_INDEX=1 PIP_FIND_LINKS=$cb/x/wheels HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 ALIGNLOOP_FORCE_CPU=1 CUDA_VISIBLE_DEVICES=
    cd "$root" || exit 1
    setsid nohup bash -c "echo \$\$ > '$cb/demo.pid'; \
      t=\$(date +%s); .venv/bin/alignloop prepare > '$cb/prepare.log' 2>&1; echo \"prepare exit \$? after \$(( \$(date +%s) - t )) s\"; \
      t=\$(date +%s); .venv/bin/alignloop demo > '$cb/demo.log' 2>&1; echo \"demo exit \$? after \$(( \$(date +%s) - t )) s\"" \
      >> "$cb/times.log" 2>&1 < /dev/null &
    sleep 2; echo "started (pid $(cat "$cb/demo.pid"))" ;;
  wait)
    deadline=$(( $(date +%s) + ${2:?wait SECONDS OUT} )); out=${3:?wait SECONDS OUT}; mkdir -p "$out"
    while running && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    running && echo "still running" || echo "finished"
    cat "$cb/times.log" 2>/dev/null
    grep -vE "HTTP Request|it/s\]|s/it\]" "$cb/demo.log" 2>/dev/null | tail -60
    cp "$cb/times.log" "$out/" 2>/dev/null
    tail -c 300000 "$cb/demo.log" > "$out/demo.log" 2>/dev/null
    tail -c 100000 "$cb/prepare.log" > "$out/prepare.log" 2>/dev/null
    [ -d "$cb/home" ] && (cd "$cb/home" && find runs cache/platform-probe -type f -size -2M \
        ! -name '*.arrow' ! -name '*.db' ! -name '*.safetensors' ! -name '*.bin' 2>/dev/null |
        tar -czf "$out/results.tgz" -T -)
    true ;;
  *) sed -n 2,14p "$0"; exit 2 ;;
esac
