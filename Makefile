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
# Django 6.1, the second supported Django (README, "Requirements"), needs Python 3.12+: its own
# virtualenv, where `make test` runs the quickstart and the suites that touch Django's internals
# after the whole suite has run on Django 5.2 in .venv. DJANGO6_PYTHON: the first Python 3.12+
# found (on PATH, else in pyenv's versions, also when HOME is unset).
DJANGO6_VENV ?= .venv-django6
DJANGO6_STAMP := $(DJANGO6_VENV)/.installed
PYENV_VERSIONS := $(shell echo $${PYENV_ROOT:-$${HOME:-$$(getent passwd $$(id -u) | cut -d: -f6)}/.pyenv}/versions)
DJANGO6_PYTHON ?= $(shell for p in python3.12 python3.13 $(PYENV_VERSIONS)/3.12*/bin/python3.12 \
  $(PYENV_VERSIONS)/3.13*/bin/python3.13; do \
  $$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
DJANGO6_TESTS ?= tests/test_quickstart.py tests/test_search_compiled.py \
  tests/test_search_settings.py tests/test_checks.py tests/test_checks_deploy.py \
  tests/test_migrations.py tests/test_admin.py tests/test_async_search.py tests/test_beat_schedule.py
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv infinity django6 browser demo test test-django6 lint bench clean-data

$(STAMP): requirements/base.txt requirements/django-5.2.txt requirements/data.txt requirements/dev.txt \
  pyproject.toml
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

$(DJANGO6_STAMP): requirements/dev-django6.txt requirements/django-6.1.txt requirements/base.txt
	@test -n "$(DJANGO6_PYTHON)" || { echo "Django 6 needs Python 3.12+ and none was found: set DJANGO6_PYTHON"; exit 1; }
	test -x $(DJANGO6_VENV)/bin/python || $(DJANGO6_PYTHON) -m venv $(DJANGO6_VENV)
	$(DJANGO6_VENV)/bin/python -m pip install -q -r requirements/dev-django6.txt
	touch $(DJANGO6_STAMP)

django6: $(DJANGO6_STAMP)

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

# The whole suite on Django 5.2 and DJANGO6_TESTS on Django 6.1 (ARGS6: its pytest options). By
# default side by side, the Django 6.1 run with its own embedded services (EMBEDDINGS_DATA_DIR
# .data-django6) and its output printed after the suite's; one after the other when DATABASE_URL
# or CELERY_BROKER_URL names shared services (the two runs would share a test database or queue).
# Fails when either fails.
ifeq ($(DATABASE_URL)$(CELERY_BROKER_URL),)
test: venv infinity browser django6
	@mkdir -p test-artifacts
	@EMBEDDINGS_DATA_DIR=$(CURDIR)/.data-django6 $(DJANGO6_VENV)/bin/python -m pytest $(ARGS6) \
	  $(DJANGO6_TESTS) > test-artifacts/django6.log 2>&1 & django6=$$!; \
	echo "Django 6.1 tests running beside the suite (output: test-artifacts/django6.log)"; \
	$(PY) -m pytest $(ARGS); suite=$$?; \
	wait $$django6; other=$$?; \
	echo "=== Django 6.1: $(DJANGO6_TESTS) ==="; cat test-artifacts/django6.log; \
	echo "Django 5.2 suite: exit $$suite; Django 6.1 tests: exit $$other"; \
	test $$suite -eq 0 && test $$other -eq 0
else
test: venv infinity browser django6
	$(PY) -m pytest $(ARGS)
	$(DJANGO6_VENV)/bin/python -m pytest $(ARGS6) $(DJANGO6_TESTS)
endif

test-django6: django6
	$(DJANGO6_VENV)/bin/python -m pytest $(ARGS6) $(DJANGO6_TESTS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m benchmarks $(ARGS)

clean-data:
	rm -rf .data .data-django6
