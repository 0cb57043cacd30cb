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
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[eval]'
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
	$(PY) -m bench.library_bench
	$(PY) -m bench.fvd_bench
	$(PY) -m bench.clipsim_bench
	$(PY) -m bench.lora_bench

# One table on one accelerator (~5 minutes with compiles; bench/accelerator_bench.py): matmul peak, the three UNet
# forwards per attention policy, the base train step with the best remat policy, 50-step base sampling. Installs
# lavie-jax with the accelerator extra it finds here (cuda where an NVIDIA GPU answers, tpu on a TPU VM); on a machine
# with neither it says so and runs the CPU-sized rows. BENCH_PYTHON=python3 runs in an environment of your own
# instead (one that already has jax for the accelerator), installing nothing. Extra flags:
# make bench-gpu BENCH_ARGS='--remat-sweep --json bench.json'
ACCEL := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo cuda; elif ls /dev/accel0 /dev/vfio/0 >/dev/null 2>&1; then echo tpu; fi)
STAMP_ACCEL := $(VENV)/.stamp-$(ACCEL)
BENCH_PYTHON ?=

$(STAMP_ACCEL): setup.py setup.cfg pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(ACCEL),eval]'
	touch $@ $(STAMP_RUN)

bench-gpu: $(if $(BENCH_PYTHON),,$(if $(ACCEL),$(STAMP_ACCEL),$(STAMP_RUN)))
	@$(if $(or $(BENCH_PYTHON),$(ACCEL)),true,echo "bench-gpu: no NVIDIA GPU or TPU here: running the CPU-sized rows (on an accelerator machine this target installs lavie-jax[cuda] or [tpu])")
	$(or $(BENCH_PYTHON),$(PY)) -m bench.accelerator_bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
