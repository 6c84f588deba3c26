# The two commands of the README. Each sets everything up on a fresh machine first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup serve test lint

setup:
	@bash scripts/setup.sh

serve: setup
	$(VENV)/bin/outrider serve

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
