# The two commands of the README: `make demo` and `make test`.
# Both set up .venv on first use (see scripts/bootstrap.sh).
VENV := .venv

.PHONY: demo test install bench

install:
	@bash scripts/bootstrap.sh

demo: install
	$(VENV)/bin/mxcube-autocenter demo

test: install
	$(VENV)/bin/python -m pytest

bench: install
	$(VENV)/bin/mxcube-autocenter bench
