# Two commands: `make demo` and `make test`. Both create a virtual environment on first use.
#
# VENV is the environment a target runs in (.venv by default), made with PYTHON. CONSTRAINTS,
# when set, is a pip constraints file that pins what the environment installs (the lowest
# supported jax, for `make test-floor`). PYTEST_ARGS goes to pytest. `.ci/run` runs `make ci`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?=
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

# The two ends of the tested range: the lowest jax (pinned in .ci/jax-floor.txt) on Python 3.11,
# and the newest jax that pip resolves on Python 3.12 (installed under pyenv).
FLOOR_CONSTRAINTS := .ci/jax-floor.txt
PYTHON311 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.11.*/bin/python3.11) python3.11)
PYTHON312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12) python3.12)

export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test suite lint format docs docs-serve verify bench bench-device accuracy test-floor test-newest ci clean

# The pip that venv brings (23.2 with Python 3.11.7 and 3.12.1) does all this needs.
$(VENV)/.created:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(VENV)/.created
	$(PIP_INSTALL) -e ".[test,experiments]"
	touch $@

# A superset of .installed-test, so that `make test` runs pip once.
$(VENV)/.installed-docs: pyproject.toml $(CONSTRAINTS) | $(VENV)/.created
	$(PIP_INSTALL) -e ".[test,experiments,docs]"
	touch $@ $(VENV)/.installed-test

$(VENV)/.installed-experiments: pyproject.toml $(CONSTRAINTS) | $(VENV)/.created
	$(PIP_INSTALL) -e ".[experiments]"
	touch $@

demo: $(VENV)/.installed-experiments
	$(PY) experiments/train_digits.py

# Lint, the documentation (a broken reference fails it), then the suite.
test: $(VENV)/.installed-docs lint docs suite

# pytest exits 5 when it collects no test; that is not a failure of the suite.
suite: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

docs: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs serve

verify: $(VENV)/.installed-test
	$(PY) -m jsoftmax verify

# Benchmarks and the accuracy campaign (minutes on 2 CPU cores); results in experiments/results/.
# `python experiments/doc_tables.py --write` then puts their tables into the docs.
bench: $(VENV)/.installed-experiments
	$(PY) experiments/bench_loss.py
	$(PY) experiments/bench_linear.py
	$(PY) experiments/bench_sharded.py

# On a machine with a GPU or TPU: the derivative checks on the device, then the benchmarks at
# accelerator-sized shapes. JSON and PNG in $(DEVICE_OUT). DEVICE_JAX installs JAX with the
# device's plugin first, e.g. `make bench-device DEVICE_JAX="jax[cuda12]==0.10.2"` (or
# "jax[tpu]==0.10.2"); the run stops if JAX then sees no accelerator. Matmuls at full precision, so that the linear head's check against the naive
# head compares like with like.
DEVICE_OUT ?= experiments/results/device
DEVICE_JAX ?=
DEVICE_LOSS_SHAPES ?= 8192x32768,1024x131072
DEVICE_LINEAR ?= --memory-dim 4096 --memory-vocab 131072 --memory-tokens 4096 8192 16384 32768 \
	--time-tokens 8192 --time-dim 4096 --time-vocab 131072 --rounds 11
bench-device: $(VENV)/.installed-experiments
	$(if $(DEVICE_JAX),$(PIP_INSTALL) "$(DEVICE_JAX)")
	$(PY) -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu' and 'bench-device: JAX sees no GPU or TPU')"
	$(PY) -m jsoftmax verify --json $(DEVICE_OUT)/verify.json
	$(PY) experiments/bench_loss.py --shapes $(DEVICE_LOSS_SHAPES) --out $(DEVICE_OUT)
	JAX_DEFAULT_MATMUL_PRECISION=highest $(PY) experiments/bench_linear.py $(DEVICE_LINEAR) \
		--out $(DEVICE_OUT)

accuracy: $(VENV)/.installed-experiments
	$(PY) experiments/accuracy.py

# The tested range: lint, docs and the suite on the lowest supported jax; the suite on the newest.
test-floor:
	$(MAKE) test VENV=.venv-floor PYTHON=$(PYTHON311) CONSTRAINTS=$(FLOOR_CONSTRAINTS)

test-newest:
	$(MAKE) suite VENV=.venv-newest PYTHON=$(PYTHON312)

ci: test-floor test-newest

clean:
	rm -rf .venv .venv-floor .venv-newest site build dist *.egg-info .pytest_cache
