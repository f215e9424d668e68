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

.PHONY: install gen run test lint fmt train export bench soak install-systemd clean

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

lint: install $(BUF)
	$(BUF) lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: install
	$(PYTHON) -m trainer train --traces $(TRACES) --seed $(SEED) --out runs/latest \
		--agent-gamma 0.8 --agent-episodes 3000 --members 2

export: install
	$(PYTHON) -m export --run runs/latest --traces $(TRACES) --embed

bench: install
	$(PYTHON) -m bwpredd.bench $(if $(QUICK),--quick)

soak: install
	$(PYTHON) -m tests.soak --minutes $(DURATION)

install-systemd: install
	sh deploy/install.sh

clean:
	rm -rf $(VENV) .tools bwpredd/_proto/bwpred build *.egg-info
