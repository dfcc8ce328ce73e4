# Set-up and everyday commands. Each target creates (or reuses) .venv and installs what it
# needs. On a machine without torch, torch==2.13.0 (CPU wheel) is installed first; a torch
# that is already importable by PYTHON is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmdc-installed

.PHONY: install demo test test-slow lint bench clean

# A torch already importable by PYTHON (a CUDA build, say) is kept: the venv then sees it.
$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmdc demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m 'slow or gpu'

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts docs/experiments/probes

bench: $(STAMP)
	$(PY) benchmarks/toy_models.py

clean:
	rm -rf $(VENV) runs data/synthetic
