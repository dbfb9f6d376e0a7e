# Every target sets up .venv first, so each works on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
LISTEN ?= 0.0.0.0:9001
DEMO_ISSUER := https://demo.extauthz.local
PROTOS := $(shell find protos -name '*.proto')

.PHONY: help install run token test lint proto

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

install: $(INSTALLED)  ## create .venv with extauthz and its test tools

# The install also compiles protos/ (setup.py), so it reruns when they change.
$(INSTALLED): pyproject.toml setup.py $(PROTOS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

run: install  ## serve the example policies in policies/ (LISTEN=HOST:PORT, default 0.0.0.0:9001)
	$(BIN)/extauthz serve --policies policies --listen $(LISTEN) \
		--workload-namespace demo --workload-label app=httpbin

token: install  ## print a token the example policies accept (GROUP=admin adds that groups claim)
	@$(BIN)/extauthz token --key deploy/demo/demo-signing-key.pem --issuer $(DEMO_ISSUER) \
		--audience httpbin.demo --kid demo-1 $(if $(GROUP),--claim 'groups=["$(GROUP)"]')

test: install  ## run every test, end-to-end ones with the real Envoy and grpcurl included
	$(BIN)/python -m pytest

lint: install  ## ruff and mypy
	$(BIN)/ruff check extauthz tests benchmarks
	$(BIN)/mypy extauthz

proto: install  ## compile protos/ again (the install does it too)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

.PHONY: bench
bench: install  ## run the benchmarks and write docs/performance.md (about 11 minutes; QUICK=1: about 4)
	@command -v h2load >/dev/null && command -v wrk >/dev/null || \
		{ apt-get update && apt-get install -y nghttp2-client wrk; }
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick)
