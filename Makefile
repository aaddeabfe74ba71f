# Two commands for a fresh machine: `make run` and `make test`. Both run `setup` first, which is
# idempotent and takes a second when everything is already in place.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test bench clean

setup: $(STAMP) data

# Reinstall only when the dependency declarations change.  constraints.txt pins torch to the
# CPU wheel that lies on this machine's disk (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package, unless the data is already there.
data:
	@if [ -n "$$AUTOLR_DATA" ] && [ -d "$$AUTOLR_DATA" ]; then exit 0; fi; \
	if ls $(FMNIST)/train-images-idx3-ubyte* >/dev/null 2>&1; then exit 0; fi; \
	echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null

run: setup
	$(PY) -m engine.run --mode alr

test: setup
	$(PY) -m pytest --benchmark-disable -q

# Benchmarks only (not tests/), a default set of about five minutes on 2 cores, ending with a
# table of each benchmark's ratio to its peer. `make bench BENCH_ARGS=--bench-long` adds the long
# ones (training epochs and ablations, the quick-preset evaluation, the 50M-parameter model).
BENCH_ARGS ?=
bench: setup
	$(PY) -m pytest --benchmark-only $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .hypothesis
