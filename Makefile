# Set-up and the two everyday commands. Everything lands in ./.venv; nothing is fetched at run time.
#   make train ARGS="model=tiny-llama trainer.max_steps=100"
#   make test  PYTEST_ARGS="tests/test_config.py -x"
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup train test clean

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU machines.
$(VENV)/.installed: pyproject.toml pretrain/data/install_corpus.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pretrain/data/install_corpus.sh
	touch $@

train: setup
	$(VENV)/bin/pretrain-train $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
