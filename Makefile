# One command per job; each sets itself up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: setup demo test bench lint format clean readme gpu-check

setup: $(STAMP)

# torch and torchvision first and pinned: these versions lie on this machine's disk, any other
# downloads gigabytes. The stamp makes a second `make setup` instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	# DeepSpeed builds against the torch above; the C++ ops distnn uses compile here, once.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check --no-build-isolation \
		-e '.[deepspeed]'
	$(BIN)/python -c 'from distnn.parallel.deepspeed import build_ops; build_ops()'
	touch $@

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

# One pool of $(PYTEST_WORKERS) workers: the quick benchmarks (their JSON's shape, not their
# speed) run as one unit beside the rest (tests/conftest.py TOGETHER).
test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=20 tests

bench: setup
	$(BIN)/python -m benchmarks.run $(if $(filter quick,$(BENCH)),--quick)
	$(BIN)/python -m benchmarks.stream_plan $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)
	$(BIN)/python -m benchmarks.remote_throughput $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)
	$(BIN)/python -m benchmarks.ckpt_remote $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)
	$(BIN)/python -m benchmarks.monitor_overhead $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)
	$(BIN)/python -m benchmarks.predict_throughput $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)
	$(BIN)/python -m benchmarks.grad_checkpoint_memory $(if $(filter quick,$(BENCH)),--quick --out benchmarks/results/quick)

# The CUDA tests and GPU benchmark rows (benchmarks/gpu_check.py); without a GPU, one line and
# exit 0. Not after `setup`: a lent GPU machine has its own torch and no registry to install
# one from, so this runs on the venv's Python where there is one, else on python3. Wheels in
# .whl/ (scripts/gpu_wheels.sh) are installed for the check.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-check:
	@$(GPU_PY) -m benchmarks.gpu_check

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs demo_data .pytest_cache

readme: setup
	$(BIN)/python scripts/update_readme.py
