# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   collect -> train -> evaluate -> report, on the local default config
#   make test   the test suite
# Both create or reuse the virtualenv at .venv. torch==2.13.0 (the CPU build) is installed first,
# so that the package's torch range is already satisfied and no CUDA build is pulled.

PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
CONFIG  ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[envs,minari,video,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/main.py --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	.venv/bin/ruff check mugato_ray jobs tests bench

# The benchmarks that need only the code. learning.py, packing.py and babyai_failures.py read a collected
# store or a checkpoint (--config ...): their commands are in bench/README.md.
BENCH_SELF = answers collect eval_memory evaluate model tokenization train

bench: $(STAMP)
	for b in $(BENCH_SELF); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf runs .pytest_cache
