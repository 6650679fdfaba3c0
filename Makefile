# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv.
# torch is installed first, pinned to the CPU wheel on local disk (see README), then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo speedrun test test-slow test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(VENV)/bin/mellum2 eval lm-eval --install-hook  # `lm_eval --model mellum2` (mellum2/eval/lmeval_hook.py)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mellum2 demo

# tokenizer -> pre-training -> long context -> SFT -> RL -> every eval -> runs/speedrun/report.md (resumable)
speedrun: $(STAMP)
	$(VENV)/bin/mellum2 speedrun --out runs/speedrun

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
