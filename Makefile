# Two commands for a newcomer: `make bench` (the main job) and `make test`.
# Everything they need is installed here, into .venv, from the package registry.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fused_resnet-installed
# The dependencies pip installs before building the extension against them.
BUILD_DEPS := "torch>=2.11" "torchvision>=0.26" ninja pybind11 "setuptools>=64" wheel numpy nvidia-cudnn-frontend

.PHONY: bench test lint test-oldest build build-oldest setup setup-oldest info verify fuzz gpu-check gpu-call gpu-wheels adopt-auto-choice clean

bench: build
	$(VENV)/bin/fused-resnet bench

test: build lint
	$(VPY) -m pytest tests -q

# The property tests in discovery mode (tests/helpers.py fuzz_settings):
# fresh examples, many of them; failures land in tests/.hypothesis-db.
FUZZ_EXAMPLES ?= 2000
fuzz: build
	env -u CI FUSED_RESNET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q tests/ops/test_fuzz_ops.py tests/nn/test_fuzz_blocks.py -m "not interpreter"

# pyflakes and pycodestyle errors, as configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check fused_resnet tests benchmarks examples tools setup.py

info: build
	$(VENV)/bin/fused-resnet info

verify: build
	$(VENV)/bin/fused-resnet verify --model resnet18

# The venv with the package installed editable and every extra for tests.
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(BUILD_DEPS)
	# Metadata, console script and test extras only; the extension is built
	# in place by `build` below (ninja, incremental).
	FUSED_RESNET_NO_EXT=1 $(VPY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

# ninja rebuilds only what changed; ptxas reports land in build/**.ptxas.log.
build: setup
	$(VPY) setup.py -q build_ext --inplace

# The oldest supported stack, the GPU machine's (Python 3.12, torch 2.11,
# torchvision 0.26, triton 3.6), in a venv of its own: the extension built
# against it and the CPU suite run on it (CI runs it after `make test`).
# Skipped there, as identical across the two stacks: the sm_80 half of the
# CUDA build (same nvcc, same sources; built for 9.0 only) and the test that
# reads its ptxas report, and the 50 s digits convergence run (pure eager
# training, no API that differs between releases).
OLDEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
OLDEST_VENV   ?= .venv-oldest
OLDEST_PINS   := torch==2.11.0 torchvision==0.26.0 triton==3.6.0
OLDEST_STAMP  := $(OLDEST_VENV)/.fused_resnet-installed
OLDEST_SKIP   := not test_bn_kernels_built_for_sm80_and_sm90 and not test_fused_and_eager_train_alike_on_digits

setup-oldest: $(OLDEST_STAMP)

$(OLDEST_STAMP): pyproject.toml setup.py
	test -n "$(OLDEST_PYTHON)" || { echo "test-oldest needs Python 3.12 (set OLDEST_PYTHON)"; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || $(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_PINS) $(BUILD_DEPS)
	FUSED_RESNET_NO_EXT=1 $(OLDEST_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[test]" $(OLDEST_PINS)
	touch $(OLDEST_STAMP)

build-oldest: setup-oldest
	TORCH_CUDA_ARCH_LIST=9.0 $(OLDEST_VENV)/bin/python setup.py -q build_ext --inplace

test-oldest: build-oldest
	$(OLDEST_VENV)/bin/python -m pytest tests -q -k "$(OLDEST_SKIP)"

# For the GPU machine (torch preinstalled, no package registry): one prepared
# command per lease, see benchmarks/README.md for the device call. GPU_CHECK
# passes options: a profile (--lease, the default; --full; --rehearsal),
# --plan (the steps with their estimated seconds), --only / --skip STEPS.
GPU_CHECK ?=
gpu-check:
	$(PYTHON) -m fused_resnet.tools.gpu_check $(GPU_CHECK)

# After a GPU run: make `auto` on that GPU follow its per-layer figures
# (writes fused_resnet/auto_choices/<gpu>.json from RECORD/auto_choice.json).
adopt-auto-choice:
	test -n "$(RECORD)" || { echo "usage: make adopt-auto-choice RECORD=benchmarks/results/<run>"; exit 1; }
	$(VPY) -m fused_resnet.tools.bench.auto_choice install $(RECORD)/auto_choice.json

# Every wheel the GPU machine lacks, for its Python (3.12, manylinux x86-64),
# into .whl/ (git-ignored), which the device call carries and gpu-check
# installs first. The cuDNN frontend's C++ headers build the cudnn backend;
# its Requires-Dist (nvidia-cutlass-dsl, apache-tvm-ffi) serve only its own
# Python API, which nothing here imports, so they stay behind (--no-deps).
GPU_WHEELS ?= nvidia-cudnn-frontend==1.32.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
# The device call to copy (benchmarks/README.md): the GPU machine gets the
# working tree without .git, so the command names the commit it runs.
GPU_COMMIT = $(shell git rev-parse HEAD)$(if $(shell git status --porcelain --untracked-files=no),-dirty)
gpu-call:
	@echo 'command:   FUSED_RESNET_GIT_COMMIT=$(GPU_COMMIT) python3 -m fused_resnet.tools.gpu_check --lease'
	@echo 'carry:     [".whl"]'
	@echo 'timeout_s: 600'
	@test -n "$$(ls .whl/*.whl 2>/dev/null)" || echo 'warning: .whl/ is empty: run make gpu-wheels first'

gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	ls -l .whl

clean:
	rm -rf build fused_resnet/_C*.so
