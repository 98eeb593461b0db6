# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint verify bench accuracy clean

$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-experiments: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[experiments]"
	touch $@

demo: $(VENV)/.installed-experiments
	$(PY) experiments/train_digits.py

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(VENV)/.installed-test $(VENV)/.installed-experiments lint
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

verify: $(VENV)/.installed-test
	$(PY) -m jsoftmax verify

# Benchmarks and the accuracy campaign (minutes on 2 CPU cores); results in experiments/results/.
bench: $(VENV)/.installed-experiments
	$(PY) experiments/bench_loss.py
	$(PY) experiments/bench_linear.py
	$(PY) experiments/bench_sharded.py

accuracy: $(VENV)/.installed-experiments
	$(PY) experiments/accuracy.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
