# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint verify bench bench-device accuracy clean

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

# On a machine with a GPU or TPU (JAX and its plugin for the device installed): the derivative
# checks on the device, then the benchmarks at accelerator-sized shapes. JSON and PNG in
# $(DEVICE_OUT). Matmuls at full precision, so that the linear head's check against the naive
# head compares like with like.
DEVICE_OUT ?= experiments/results/device
DEVICE_LOSS_SHAPES ?= 8192x32768,1024x131072
DEVICE_LINEAR ?= --memory-dim 4096 --memory-vocab 131072 --memory-tokens 4096 8192 16384 32768 \
	--time-tokens 8192 --time-dim 4096 --time-vocab 131072 --rounds 11
bench-device: $(VENV)/.installed-experiments
	$(PY) -m jsoftmax verify --json $(DEVICE_OUT)/verify.json
	$(PY) experiments/bench_loss.py --shapes $(DEVICE_LOSS_SHAPES) --out $(DEVICE_OUT)
	JAX_DEFAULT_MATMUL_PRECISION=highest $(PY) experiments/bench_linear.py $(DEVICE_LINEAR) \
		--out $(DEVICE_OUT)

accuracy: $(VENV)/.installed-experiments
	$(PY) experiments/accuracy.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
