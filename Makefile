# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test test-fast bench clean

# pyproject.toml says which versions graft accepts (ranges, for users); constraints.txt pins the
# exact set this project tests with, so every checkout and CI run gets the same one.
$(BIN)/graft: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(BIN)/graft

venv: $(BIN)/graft

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

bench: venv
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache
