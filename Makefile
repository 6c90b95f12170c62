# Two entry points for a fresh machine (see README):  make demo  /  make test
# Both create .venv when it is missing. pip (not uv/poetry) so the local CPU torch wheel is used.
# TORCH=cpu|cuda picks the torch build (below).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.diclip-installed

# Which torch build the venv gets: TORCH=cpu (default) or TORCH=cuda (`make demo TORCH=cuda`).
#  cpu:  the CPU wheel from PyTorch's CPU index (the PyPI Linux wheel is a ~3 GB CUDA build), unless pip
#        already has a local wheel folder (find-links, as on offline CI machines): then pip resolves
#        torch==2.13.0 from that folder exactly as before, with no index and no network.
#  cuda: PyPI's default torch 2.13.0 Linux wheel (CUDA 13.0), and DeepSpeed on the GPU.
# An existing venv keeps its torch: to switch, remove .venv (the install stamp is not per TORCH value).
TORCH ?= cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
LOCAL_WHEELS := $(strip $(PIP_FIND_LINKS)$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
ifeq ($(TORCH),cpu)
TORCH_PIP_ARGS ?= $(if $(LOCAL_WHEELS),,--index-url $(TORCH_CPU_INDEX))
else ifeq ($(TORCH),cuda)
TORCH_PIP_ARGS ?=
else
$(error TORCH must be cpu or cuda, got '$(TORCH)')
endif

# DeepSpeed on the torch build's device; its JIT-built ops go to a per-torch-version folder (a stale one can hang).
export DS_ACCELERATOR ?= $(if $(filter cuda,$(TORCH)),cuda,cpu)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions/torch-2.13
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED ?= 1
# Ray Train's controller polls its workers every 2 s by default, at the worker group's start, end and failure:
# a short run (the demo's, every training test) waits out several polls. 0.25 s: 13 s instead of 20 s per
# tiny training run on 2 cores (measured, bench/train_start.py); a cluster user may leave Ray's default.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.25

.PHONY: demo test test-fast venv bench fullsize-check toy-models clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0 torchvision==0.28.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diclip run configs/demo.yaml

# pytest workers (pytest-xdist; tests/conftest.py hands out whole test files): the suite's stage runs leave
# a CPU idle while they wait (a store restart, a lost node, a poll), which a second worker's tests use.
# Each worker has a Ray of its own (2 CPUs), so more workers than cores only oversubscribe them.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25

# the edit loop (~3 min): everything but the tests that start Ray, DeepSpeed, the object store or CLI runs
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" --durations=10

bench: $(STAMP)
	for b in bench/[a-z]*.py; do case $$b in *fullsize_check.py|*gpu_check.py) continue;; esac; echo "== $$b"; $(PY) $$b || exit 1; done

# real-size geometry with random-init ViT-B/16 + SD 2.1-base topology (~5 GB of models, 20-30 min on 2 cores)
fullsize-check: $(STAMP)
	$(PY) bench/fullsize_check.py

# re-train the toy models the demo ships (diclip/resources/toy): ~25 min on 2 cores, resumable
toy-models: $(STAMP)
	$(VENV)/bin/diclip pretrain-toy --out runs/toy-models

clean:
	rm -rf runs/demo runs/tiny .pytest_cache
