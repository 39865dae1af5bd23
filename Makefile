# The two commands of the README: `make demo` and `make test`.
# Both set up .venv on first use (see scripts/bootstrap.sh).
VENV := .venv

.PHONY: demo test install bench

install:
	@bash scripts/bootstrap.sh

# The full loop (record, label, fine-tune, report its figures), centring with the shipped model:
# fine-tuned on the demo's 20 samples it centres worse than as shipped (see models/README.md).
demo: install
	$(VENV)/bin/mxcube-autocenter demo --use-shipped-model

test: install
	$(VENV)/bin/python -m pytest

bench: install
	$(VENV)/bin/mxcube-autocenter bench
