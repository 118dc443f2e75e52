# Two commands for a newcomer: `make bench` (the main job) and `make test`.
# Everything they need is installed here, into .venv, from the package registry.

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fused_resnet-installed
# The dependencies pip installs before building the extension against them.
BUILD_DEPS := "torch>=2.11" "torchvision>=0.26" ninja pybind11 "setuptools>=64" wheel numpy nvidia-cudnn-frontend

.PHONY: bench test build setup info verify gpu-check clean

bench: build
	$(VENV)/bin/fused-resnet bench

test: build
	$(VPY) -m pytest tests -q

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

# For the GPU machine (torch preinstalled, no package registry): see
# benchmarks/README.md for the steps one by one.
# GPU_CHECK passes options, e.g. GPU_CHECK="--only build,cuda-tests" (one
# device command is limited to 10 minutes; see benchmarks/README.md).
GPU_CHECK ?=
gpu-check:
	FUSED_RESNET_NO_EXT=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -m fused_resnet.gpu_check $(GPU_CHECK)

clean:
	rm -rf build fused_resnet/_C*.so
