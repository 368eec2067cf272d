#!/usr/bin/env bash
# Device side, once per machine: join the carried parts, unpack the two environments, write the
# serving interpreter wrapper. Run from the repo root after every part is in /tmp/parts:
#   bash benchmarks/gpu/device_install.sh && source benchmarks/gpu/device_env.sh
set -euo pipefail
t0=$(date +%s)
mkdir -p /tmp/b
cat /tmp/parts/p[0-9]* | tar x -C /tmp/b
(cd /tmp/b && sha256sum -c --quiet SHA256SUMS)
unpack() {  # xz with threads when the image has it, else Python's lzma
  if command -v xz >/dev/null; then tar -C "$2" -I 'xz -d -T0' -xf "$1"
  else python3 -c "import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$1" "$2"; fi
}
unpack /tmp/b/site.tar.xz /tmp & unpack /tmp/b/pipe_site.tar.xz /tmp & unpack /tmp/b/extras.tar.xz /tmp/b & wait
py=$(command -v python3)
# The serving env: vLLM 0.26.0's packages over the image's torch. VLLMServer and evals.perf drop
# PYTHONPATH from their children's environment (it belongs to the pipeline env), so the
# interpreter they start sets its own.
cat > /tmp/serve-python <<W
#!/bin/sh
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
exec $py "\$@"
W
chmod +x /tmp/serve-python
echo "installed in $(( $(date +%s) - t0 ))s: $(du -sh /tmp/site /tmp/pipe_site | tr '\n' ' ')"
