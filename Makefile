# `make test` builds everything from nothing: .venv, torch (CPU build where there is no GPU), the package,
# the test dependencies; then runs the suite. `make demo` prints a small benchmark on this machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch for machines without a GPU; override e.g. TORCH_SPEC="torch" elsewhere.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo fuzz gpu-check gpu-tune clean

# The compiled extensions (CMakeLists.txt, csrc/) are rebuilt by the editable install when their sources change.
$(STAMP): setup.py pyproject.toml requirements-dev.txt CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests benchmarks/test_bench.py

demo: $(STAMP)
	$(PY) benchmarks/run.py --quick --out benchmarks/results/_scratch/demo

# Nightly-style property run: 5,000 random cases per backend (FUZZ_EXAMPLES=n for another count); the
# statistics show how many ran per backend.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --hypothesis-show-statistics tests/test_properties.py

gpu-check:
	bash benchmarks/gpu_check.sh

# On a GPU: measure the Triton tile configs and schedules, pin the fastest (commit the JSON it writes).
gpu-tune:
	python3 benchmarks/tune_triton.py --write

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
