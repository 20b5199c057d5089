# Two commands on a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: demo test install install-dev browser benchmark benchmark-real reproduce clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Debian's Chromium for the real-browser test (Playwright never downloads a browser here).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: $(VENV)/.installed
	$(PY) app.py --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests

benchmark: $(VENV)/.installed
	$(PY) benchmark.py

# real_dev rows, with RapidOCR off the shelf measured beside them on the same photos
benchmark-real: $(VENV)/.installed
	$(PY) benchmark.py --real-only --rapidocr

# Rebuild every checkpoint (hours on a CPU; resumable: run it again after an interruption).
reproduce: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m train.reproduce

clean:
	rm -rf $(VENV) .pytest_cache out runs
