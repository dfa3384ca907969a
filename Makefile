# Parley. `make run` starts the service, `make test` runs the tests; both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PROTO_OUT := parley/v1/voice_pb2.py parley/v1/voice_pb2.pyi parley/v1/voice_pb2_grpc.py

.PHONY: setup run test proto proto-check lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing Parley with its embedded models"
	@echo "    (the first install compiles llama-cpp-python: about 5 minutes on 2 cores; pip then caches it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(PY) -m service

test: setup
	$(PY) -m pytest

proto: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/parley/v1/voice.proto

# Fails when the generated code is out of date with protos/.
proto-check: proto
	git diff --exit-code -- parley/ || (echo "generated code is stale: run 'make proto' and commit" && exit 1)
	test -z "$$(git status --porcelain -- parley/)" || (echo "untracked generated files: run 'make proto' and commit" && exit 1)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m benchmarks.first_audio

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
