# The targets people type. `make run` and `make test` work from a fresh clone:
# each installs what it needs first.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
PYTHON    := $(BIN)/python
STAMP     := $(VENV)/.installed
BUF       := .tools/node_modules/.bin/buf
BUF_VER   := 1.75.0
PROTO     := proto/bwpred/v1/bwpred.proto
GEN_DIR   := bwpredd/_proto/bwpred/v1
GEN       := $(GEN_DIR)/bwpred_pb2.py $(GEN_DIR)/bwpred_pb2.pyi $(GEN_DIR)/bwpred_pb2_grpc.py $(GEN_DIR)/bwpred_pb2_grpc.pyi
TRACES    ?= $(or $(BWPRED_TRACES),../shared/traces)
SEED      ?= 0
QUICK     ?=
DURATION  ?= 5
RECORDINGS ?=
BASE      ?= bwpredd/models/default
RUN       ?= runs/retrain

# The Go client (clients/go) builds in GOPATH mode against Debian's Go
# packages (/usr/share/gocode): no module proxy needed. build/gopath links the
# repo under its import path.
GO_PKG    := github.com/novacron/bwpredd/clients/go
GO_DIR    := clients/go
GO_GEN    := $(GO_DIR)/bwpred.pb.go $(GO_DIR)/bwpred_grpc.pb.go
GO_PATH   := $(CURDIR)/build/gopath
GO_ENV    := GO111MODULE=off GOFLAGS= GOPATH=$(GO_PATH):/usr/share/gocode
GO_APT    := golang-go protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc \
             golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
GO_PROTOC  = protoc -Iproto --go_out=$(1) --go_opt=module=$(GO_PKG) \
             --go-grpc_out=$(1) --go-grpc_opt=module=$(GO_PKG) $(PROTO)
HAVE_GO   := $(shell command -v go >/dev/null 2>&1 && echo yes)

.PHONY: install gen run test lint fmt train retrain report-allocator export bench soak install-systemd clean mesh-demo \
        go-apt go-gen go-check-gen go-lint go-test

install: $(STAMP) $(GEN)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -U pip setuptools wheel
	# torch first, pinned, so that no other spec pulls a multi-GB build.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[train,dev]'
	touch $@

gen: $(GEN)

# Generated code is a file target of its .proto and never edited by hand.
# protoc writes absolute imports of the proto package (bwpred.v1); they are
# rewritten to the vendored location so no sys.path trick is needed.
$(GEN) &: $(PROTO) | $(STAMP)
	mkdir -p $(GEN_DIR)
	$(PYTHON) -m grpc_tools.protoc -Iproto \
	  --python_out=bwpredd/_proto --pyi_out=bwpredd/_proto \
	  --grpc_python_out=bwpredd/_proto --mypy_grpc_out=bwpredd/_proto \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc $(PROTO)
	sed -i 's/^from bwpred\.v1 import/from bwpredd._proto.bwpred.v1 import/; s/^import bwpred\.v1\.bwpred_pb2$$/import bwpredd._proto.bwpred.v1.bwpred_pb2/; s/\bbwpred\.v1\.bwpred_pb2\./bwpredd._proto.bwpred.v1.bwpred_pb2./g' $(GEN_DIR)/bwpred_pb2_grpc.py $(GEN_DIR)/bwpred_pb2_grpc.pyi
	touch bwpredd/_proto/bwpred/__init__.py $(GEN_DIR)/__init__.py
	touch $(GEN)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VER)

run: install
	$(BIN)/bwpredd

test: install
	$(BIN)/pytest -q
ifeq ($(HAVE_GO),yes)
	$(MAKE) --no-print-directory go-test
else
	@echo "Go client tests SKIPPED: no Go toolchain on PATH (make go-apt installs it)"
endif

lint: install $(BUF)
	$(BUF) lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
ifeq ($(HAVE_GO),yes)
	$(MAKE) --no-print-directory go-lint
else
	@echo "Go client lint SKIPPED: no Go toolchain on PATH (make go-apt installs it)"
endif

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: install
	$(PYTHON) -m trainer train --traces $(TRACES) --seed $(SEED) --out runs/latest \
		--agent-gamma 0.8 --agent-episodes 3000 --members 2

# Fine-tune BASE on recordings (one node's directory, or several nodes' side
# by side) into RUN; then: python -m export --run $(RUN) --gate --out DIR.
retrain: install
	$(if $(RECORDINGS),,$(error RECORDINGS=DIR [DIR...] is required: recordings directories))
	$(PYTHON) -m trainer retrain --recordings $(RECORDINGS) --base $(BASE) --out $(RUN) \
		--seed $(SEED)

# The shipped model re-scored on make train's split (same seed), without
# training: rewrites reports/allocator.md, allocator_eval.json and the example
# plot (and includes reports/allocator_limits.json when present).
report-allocator: install
	$(PYTHON) -m trainer report-allocator --traces $(TRACES) --seed $(SEED) \
		--model bwpredd/models/default

export: install
	$(PYTHON) -m export --run runs/latest --traces $(TRACES) --embed

bench: install
	$(PYTHON) -m bench $(if $(QUICK),--quick)

soak: install
	$(PYTHON) -m bench.soak --minutes $(DURATION)

# Three daemons record fabric links, retrain on their recordings, gate, reload.
mesh-demo: install
	$(PYTHON) -m bench.mesh_demo

install-systemd: install
	sh deploy/install.sh

clean:
	rm -rf $(VENV) .tools bwpredd/_proto/bwpred build *.egg-info

# -- the Go client ------------------------------------------------------------------

# Debian's packages for the Go client (CI runs as root on a fresh machine).
# Naming golang-github-golang-protobuf-1-5-dev matters: without it apt picks
# the 1.3 package and the client panics on its first reply.
go-apt:
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $(GO_APT) >/dev/null'

$(GO_PATH)/src/$(GO_PKG):
	mkdir -p $(GO_PATH)/src/github.com/novacron
	ln -sfn $(CURDIR) $(GO_PATH)/src/github.com/novacron/bwpredd

# The Go code is generated from the .proto, never edited by hand, and
# committed (a Go user builds without protoc): go-check-gen fails when it is
# stale.
go-gen:
	$(call GO_PROTOC,$(GO_DIR))

go-check-gen:
	@if ! command -v protoc-gen-go-grpc >/dev/null || ! command -v protoc-gen-go >/dev/null || \
	    ! command -v protoc >/dev/null; then \
	  echo "Go code staleness check SKIPPED: protoc, protoc-gen-go or protoc-gen-go-grpc missing (make go-apt)"; \
	else \
	  rm -rf build/go-gen && mkdir -p build/go-gen && \
	  $(call GO_PROTOC,build/go-gen) && \
	  for f in $(notdir $(GO_GEN)); do \
	    cmp -s build/go-gen/$$f $(GO_DIR)/$$f || { \
	      echo "$(GO_DIR)/$$f is stale: run make go-gen and commit it"; exit 1; }; done; \
	  echo "Go code up to date with $(PROTO)"; \
	fi

go-lint: go-check-gen | $(GO_PATH)/src/$(GO_PKG)
	@out=$$(gofmt -l $(GO_DIR)); test -z "$$out" || { echo "gofmt needed: $$out"; exit 1; }
	cd $(GO_PATH)/src/$(GO_PKG) && $(GO_ENV) go vet .

# Against a real daemon: the tests start `$$BWPRED_PYTHON -m bwpredd` (this
# venv's python by default) with a real model directory.
go-test: install go-lint | $(GO_PATH)/src/$(GO_PKG)
	cd $(GO_PATH)/src/$(GO_PKG) && BWPRED_PYTHON=$${BWPRED_PYTHON:-$(CURDIR)/$(PYTHON)} \
	  $(GO_ENV) go test -count=1 -v .
