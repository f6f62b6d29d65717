# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make demo   the main job: a real embedding model migration on real articles
#   make test   the test suite (real PostgreSQL + pgvector, real models, real Celery workers)
# Both create (or reuse) the project-local virtualenv .venv from requirements/.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The OpenAI-compatible embedding server the provider tests run (infinity-emb): its own
# virtualenv, since it needs sentence-transformers < 4.
INFINITY_VENV ?= .venv-infinity
INFINITY_STAMP := $(INFINITY_VENV)/.installed
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv infinity browser demo test lint bench clean-data

$(STAMP): requirements/base.txt requirements/data.txt requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

$(INFINITY_STAMP): requirements/infinity.txt
	test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install -q -r requirements/infinity.txt
	touch $(INFINITY_STAMP)

infinity: $(INFINITY_STAMP)

demo: venv
	$(PY) manage.py demo $(ARGS)

# The admin's browser tests drive Debian's headless Chromium through the system chromedriver;
# installed here only when missing (never a browser download). Without them those tests fail.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing Debian's chromium and chromium-driver"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    || echo "WARNING: could not install chromium; the browser tests will fail"; \
	fi

test: venv infinity browser
	$(PY) -m pytest $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m benchmarks $(ARGS)

clean-data:
	rm -rf .data
