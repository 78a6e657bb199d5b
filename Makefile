# `make demo` and `make test` each do the whole set-up on a fresh Debian machine, idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev libjpeg-dev dataset-fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-gpu system-deps venv clean

demo: $(STAMP)
	$(BIN)/fastimagenet demo

# A new random order each run (pytest-randomly); the seed is printed last, to run that order again.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Everything but the tests marked slow (real processes, torchrun, the whole demo): a quicker loop while editing.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# GPU tests only (run on a machine with CUDA).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

# FFCV compiles against OpenCV and libjpeg-turbo, our JPEG region decoder (loaders/_jpeg_roi.c) against libjpeg-turbo's
# libjpeg API (libjpeg-dev); the demo reads Debian's Fashion-MNIST.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing system packages; run: sudo apt-get update && sudo apt-get install -y $$missing"; exit 1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.txt pyproject.toml setup.py loaders/_jpeg_roi.c | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

clean:
	rm -rf $(VENV) runs
