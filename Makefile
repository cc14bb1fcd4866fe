# The two commands the README starts with:
#   make serve   set up .venv and run the main job (a local cluster on the tiny preset, CPU)
#   make test    set up .venv and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch installs fast from the local index; GPU hosts bring their own torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve test lint protos gpu-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

# A local cluster (router + 1 prefill + 1 decode worker, tiny preset, CPU) that answers a demo
# prompt, then keeps serving on 127.0.0.1:50051 until Ctrl-C. SERVE_ARGS adds `pdserve up` flags.
SERVE_ARGS ?=
serve: setup
	$(VENV)/bin/pdserve up $(SERVE_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m protos.generate --check

# Regenerate protos/pdserve/v1/*_pb2*.py from the .proto files (commit the result).
protos: setup
	$(PY) -m protos.generate

# pytest exits 5 when it collects nothing, so an empty run fails here rather than passing silently.
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

gpu-test:
	python3 -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
