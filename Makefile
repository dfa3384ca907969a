# Parley. `make run` starts the service, `make test` runs the tests; both set up .venv on first use.

# The interpreter .venv is made from (`make PYTHON=... setup` chooses another): the system's own
# python3 when it is 3.11 or newer and can make a venv, else python3 on PATH. Distributions build
# their python3 with profile-guided and link-time optimization; on this project's machine a plain
# source build (pyenv's default) took 1.25 to 1.44 times as long to cut and normalize a reply, and
# the service's first audio under load was later on it (README, "Benchmarks").
ifeq ($(strip $(PYTHON)),)
override PYTHON := $(shell p=$$(command -p -v python3) && "$$p" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo "$$p" || echo python3)
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PROTO_OUT := parley/v1/voice_pb2.py parley/v1/voice_pb2.pyi parley/v1/voice_pb2_grpc.py

.PHONY: setup system-deps run test proto proto-check lint bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) (from $(PYTHON), unless it exists) and installing Parley with its embedded models"
	@echo "    (the first install compiles llama-cpp-python: about 6 minutes on 2 cores; pip then caches it)"
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Parley needs Python 3.11 or newer, which $(PYTHON) is not (make PYTHON=python3.11 setup)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The service and the WebSocket bridge together (scripts/run.py): Ctrl-C stops both gracefully (exit 0);
# if either stops on its own, the other is stopped too and the reason is printed last (exit non-zero).
run: setup
	@$(PY) scripts/run.py

# Debian packages the tests and benchmarks drive: Chromium (Playwright cannot download browsers
# here), Redis, openssl (the TLS tests make a CA with it), and gRPC C++ with a compiler (the compiled
# load generator, benchmarks/loadgen/).
TEST_PACKAGES := chromium redis-server openssl g++ pkg-config libgrpc++-dev protobuf-compiler-grpc
system-deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  echo "note: not a Debian system: install $(TEST_PACKAGES) (or their equivalents) or the tests that need them are skipped"; \
	  exit 0; fi; \
	missing=""; for p in $(TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "==> installing Debian packages for the tests:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: install$$missing (sudo apt-get install$$missing) or the tests that need them are skipped"; fi; \
	fi

test: setup system-deps
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
	$(VENV)/bin/mypy scripts/run.py

bench: setup system-deps
	$(PY) -m benchmarks.bench

# Parley against a Pipecat pipeline on the same models (benchmarks/PEERS.md). Pipecat and the shared
# llama.cpp server live in their own venv, .venv-peers, so their pins do not disturb Parley's.
# Options: make bench-peers PEERS_ARGS="--reps 2 --parley-rev HEAD~1"
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed-$(shell cat benchmarks/peers/requirements.txt | sha1sum | cut -c1-12)
PEERS_ARGS ?=

$(PEERS_STAMP): benchmarks/peers/requirements.txt
	@echo "==> creating $(PEERS_VENV) with Pipecat and the llama.cpp server"
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --progress-bar on -r benchmarks/peers/requirements.txt
	rm -f $(PEERS_VENV)/.installed-*
	touch $@

bench-peers: setup $(PEERS_STAMP)
	$(PY) -m benchmarks.peers --peers-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .mypy_cache .ruff_cache
