# Set-up and the two everyday commands. Everything lands in ./.venv; nothing is fetched at run time.
#   make train ARGS="model=tiny-llama trainer.max_steps=100"
#   make test  PYTEST_ARGS="tests/test_config.py -x"
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup train test clean

setup: $(VENV)/.installed

# Exact versions from constraints.txt (what the tests were measured on); pyproject.toml holds only
# compatible ranges. torch first: its CPU build (constraints.txt's torch==2.13.0) lies on this
# machine's disk, and an unpinned torch pulls a multi-GB CUDA build onto CPU machines.
CONSTRAINTS := constraints.txt
PIP_INSTALL := $(PY) -m pip install --quiet -c $(CONSTRAINTS)

# setuptools warns (a UserWarning) at every editable install that a folder named like a package could
# shadow it; the terminal of `make train` shows only real problems.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) pretrain/data/install_corpus.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch
	PYTHONWARNINGS=ignore::UserWarning $(PIP_INSTALL) -e '.[cpu,dev,eval]'
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pretrain/data/install_corpus.sh
	touch $@

train: setup
	$(VENV)/bin/pretrain-train $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
