#!/usr/bin/env bash
# Install alignloop's two environments on a box with no package index, from a bundle made by
# offline/build_bundle.py (docs/GPU.md, "A GPU box with no package index").
#
#   bash offline/install.sh BUNDLE_DIR [--prefix DIR]      (from the checkout on the box)
#
# --prefix where .venv and .venv-serve go (default: the checkout, as `make setup` puts them)
#
# Both envs are virtual environments over the box's own Python packages (its CUDA torch above
# all): the box's site-packages are appended through a .pth file, so a package the bundle carries
# shadows the box's copy and everything else comes from the box. The pipeline env gets the
# checkout on its path and the `alignloop` command; pip in it finds the embedded model's wheel in
# the bundle (no index).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
here=$(cd "${1:?usage: install.sh BUNDLE_DIR [--prefix DIR]}" && pwd); shift
prefix=""
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
prefix=${prefix:-$repo}; mkdir -p "$prefix"; prefix=$(cd "$prefix" && pwd)
t0=$(date +%s)
(cd "$here" && sha256sum -c --quiet SHA256SUMS)
want=$(python3 -c "import json; print(json.load(open('$here/manifest.json'))['python'])")
have=$(python3 -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
[ "$want" = "$have" ] || { echo "bundle is for Python $want, this box has $have" >&2; exit 1; }
box_sites=$(python3 -c "import site; print('\n'.join(site.getsitepackages()))")

unpack_xz() {  # xz with threads when the box has it, else Python's lzma
  if command -v xz >/dev/null; then tar -I 'xz -d -T0' -xf "$1" --strip-components=1 -C "$2"
  else python3 - "$1" "$2" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tf:
    for m in tf.getmembers():
        m.name = m.name.split("/", 1)[1] if "/" in m.name else "."
        tf.extract(m, sys.argv[2])
PY
  fi
}

make_env() {  # make_env NAME BUNDLE_ENV -> prints the env's site-packages
  local venv="$prefix/$1" env=$2
  rm -rf "$venv"
  python3 -m venv --without-pip --system-site-packages "$venv"
  local site
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$box_sites" > "$site/_box_site.pth"
  if [ -f "$here/site-$env.tar.xz" ]; then
    unpack_xz "$here/site-$env.tar.xz" "$site"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$here/wheels-$env"/*.whl
  fi
  echo "$site"
}

serve_site=$(make_env .venv-serve serve | tail -1)
if ! "$prefix/.venv-serve/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('flashinfer') is None)"; then
  # No flashinfer here (the bundle leaves it out): vLLM's sampler must not try to import it.
  echo 'import os; os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")' > "$serve_site/_alignloop_no_flashinfer.pth"
fi
pipe_site=$(make_env .venv pipeline | tail -1)
echo "$repo" > "$pipe_site/alignloop.pth"
cat > "$prefix/.venv/pip.conf" <<CONF
[global]
no-index = true
find-links = $here/model
CONF
cat > "$prefix/.venv/bin/alignloop" <<SCRIPT
#!$prefix/.venv/bin/python
from flows.cli import app
if __name__ == "__main__":  # the gateway's worker processes are spawned: they import this file
    app()
SCRIPT
chmod +x "$prefix/.venv/bin/alignloop"
"$prefix/.venv/bin/python" -c "import flows.cli, trl, prefect, torch; print('pipeline env: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$prefix/.venv-serve/bin/python" -c "import vllm; print('serving env: vllm', vllm.__version__)"
echo "installed in $(( $(date +%s) - t0 )) s: $prefix/.venv, $prefix/.venv-serve"
if [ "$prefix" != "$repo" ]; then
  echo "then: export ALIGNLOOP_SERVE_PYTHON=$prefix/.venv-serve/bin/python PATH=$prefix/.venv/bin:\$PATH"
fi
