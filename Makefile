# One virtual environment in .venv; every target sets it up first if needed.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
BIN := $(VENV)/bin
# Without a GPU, install the CPU build of torch first; with one, let pip choose the CUDA build.
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo tiny-demo lint tiny-assets clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install -q "$(TORCH_CPU)"; fi
	$(PYTHON) -m pip install -q -e ".[dev]"
	@# The registry's torchvision is built against the CUDA torch: beside the CPU one it does not import
	@# and breaks transformers' CLIPImageProcessor and open_clip, so a CPU install must not hold it.
	if ! command -v nvidia-smi >/dev/null 2>&1 && $(PYTHON) -m pip show torchvision >/dev/null 2>&1; then \
		echo "make install: torchvision is installed beside the CPU torch (it does not import there and breaks CLIPImageProcessor): $(PYTHON) -m pip uninstall torchvision"; exit 1; fi
	touch $@

# One worker process per core (pytest-xdist), one thread each: several tests launch training
# subprocesses and DDP ranks, which would otherwise oversubscribe a small CI machine.
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n auto

tiny-assets: install
	test -f .tiny/model/model_index.json || $(PYTHON) -m lightning_refdpo.testing .tiny

demo: install
	$(PYTHON) -m lightning_refdpo.toy.demo --config configs/demo.yaml --output outputs/demo

tiny-demo: tiny-assets
	$(BIN)/lightning-refdpo fit --config configs/tiny.yaml

lint: install
	$(BIN)/ruff check lightning_refdpo tests benchmarks scripts
	$(BIN)/ruff format --check lightning_refdpo tests benchmarks scripts
	$(BIN)/lint-imports

clean:
	rm -rf .tiny outputs lightning_logs
