# Quick start targets. Each creates (or updates) ./.venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.stamp-run
STAMP_TEST := $(VENV)/.stamp-test
# setup.cfg takes version ranges; CI installs their lower bounds exactly (the versions the suite is known to pass on)
CONSTRAINTS := constraints/lower-bounds.txt

.PHONY: demo test bench bench-gpu clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): setup.py setup.cfg pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(STAMP_TEST): setup.py setup.cfg pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@ $(STAMP_RUN)

# The main job on the embedded default (no downloads): builds the moving_shapes data, trains a small autoencoder and
# the three stages with lavie-train, samples the cascade with lavie-sample and checks the videos from their pixels
# (outputs/demo: videos per stage, overview.png, summary.json). A second run resumes and only samples again.
demo: $(STAMP_RUN)
	$(PY) -m lavie_jax.demo

test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# Benchmarks print tables; they are not part of `make test` (minutes on 2 CPU cores).
bench: $(STAMP_TEST)
	$(PY) -m bench.unet_bench
	$(PY) -m bench.data_bench
	$(PY) -m bench.encoders_bench
	$(PY) -m bench.convert_bench
	$(PY) -m bench.sampling_bench
	$(PY) -m bench.cpu_torch_bench
	$(PY) -m bench.startup_bench

# One table on one accelerator (~5 minutes with compiles; bench/accelerator_bench.py): matmul peak, the three UNet
# forwards per attention policy, the base train step with the best remat policy, 50-step base sampling. Runs in the
# current environment, which needs lavie-jax with its accelerator extra (pip install -e '.[cuda]' or '.[tpu]'); on
# a CPU it runs the tiny configs. Extra flags: make bench-gpu BENCH_ARGS='--remat-sweep --json bench.json'
BENCH_PYTHON ?= $(PYTHON)
bench-gpu:
	$(BENCH_PYTHON) -m bench.accelerator_bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
