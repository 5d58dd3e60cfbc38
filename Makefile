# The two commands of the README. Each creates .venv on first use (scripts/bootstrap.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test env clean
env: $(VENV)/.installed
$(VENV)/.installed: setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

demo: env            ## train the CPU demo (embedded data, 6-12 min on 2 cores); re-running continues/finishes it
	$(VENV)/bin/hpc-gan train --config configs/demo.yaml --resume auto

test: env            ## the whole test suite (CPU only)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs/demo
