# The README's commands. `make run` starts the demo; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test lint bench clean-demo

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

## The demo: migrate the embedded database, create the demo login, load demo data, serve.
run: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py load_demo --url http://$(HOST):$(PORT) $(if $(DATA),--data $(DATA))
	$(PY) manage.py runserver $(HOST):$(PORT)

## The tests (pytest-django on real PostgreSQL: embedded by default, DATABASE_URL honoured).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) manage.py bench_ingest
