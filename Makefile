# rsclip: every workflow is one make target. `make demo` runs the main job, `make test` all tests.
# PG selects the PostgreSQL major version: 18 (default, primary) or 15.
PG ?= 18
SHELL := /bin/bash
ENV := source tools/env.sh &&
PY := $(ENV) "$$RSCLIP_VENV/bin/python"
ITEST_PORT := $(shell echo $$((25400 + $(PG))))
FUZZ_SECONDS ?= 30

.PHONY: setup build install citus lint lint-versions unit pgtest itest test server stop demo bench bench-index real-embeddings bench-cache bench-backfill bench-encode bench-concurrency base-model export-env fuzz fixture clean

setup:
	@bash tools/setup.sh

build: setup
	@$(ENV) cargo build --features pg$(PG) --no-default-features

# Release build installed into the chosen server's own directories (the embedded PG18 or the
# private PG15 copy), never into /usr.
install: setup
	@$(ENV) cargo pgrx install --release --pg-config "$$(rsclip_pg_config $(PG))" --features pg$(PG) --no-default-features \
	  > "$$RSCLIP_LOCAL/install-pg$(PG).log" 2>&1 || { cat "$$RSCLIP_LOCAL/install-pg$(PG).log"; exit 1; }
	@# earlier versions' install scripts (kept verbatim) and the upgrade scripts between versions
	@$(ENV) cp sql/versions/*.sql sql/upgrade/*.sql "$$("$$(rsclip_pg_config $(PG))" --sharedir)/extension/"
	@echo "installed rsclip into PostgreSQL $(PG)"

lint: setup
	@$(ENV) cargo fmt --all -- --check
	@$(ENV) cargo clippy --all-targets --features pg$(PG) --no-default-features -- -D warnings
	@$(ENV) cargo clippy -p rsclip-core -p rsclip-model -p rsclip-index -p rsclip-infer --all-targets -- -D warnings

# The pg16 and pg17 features, compiled and linted against their server headers
# (tools/pg_headers.sh); the tests run on 18 and 15.
lint-versions: setup
	@$(ENV) for v in 16 17; do \
	  cargo clippy --all-targets --features pg$$v --no-default-features -- -D warnings || exit 1; \
	  echo "pg$$v: compiles, clippy clean"; done

unit: setup
	@$(ENV) cargo test -p rsclip-core -p rsclip-model -p rsclip-index -p rsclip-infer

pgtest: setup
	@$(ENV) mkdir -p "$$RSCLIP_LOCAL/pgrx-test" && { [ "$$(id -u)" != 0 ] || chown "$$PG_USER" "$$RSCLIP_LOCAL/pgrx-test"; } && \
	  CARGO_PGRX_TEST_RUNAS=$$( [ "$$(id -u)" = 0 ] && echo "$$PG_USER" ) \
	  CARGO_PGRX_TEST_PGDATA="$$RSCLIP_LOCAL/pgrx-test/data-$(PG)" \
	  cargo pgrx test pg$(PG)

# Citus 14 from source into the PG18 tree, for the multi-node tests (Citus supports PG16-18).
citus: setup
	@bash tools/citus.sh

# Integration tests against a real running server (its own cluster, port 554xx).
itest: install $(if $(filter 18,$(PG)),citus)
	@$(PY) tools/cluster.py start --pg $(PG) --name itest --port $(ITEST_PORT) >/dev/null
	@$(ENV) RSCLIP_TEST_URI="postgresql://postgres@127.0.0.1:$(ITEST_PORT)/postgres" RSCLIP_TEST_PG=$(PG) \
	  "$$RSCLIP_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integration; rc=$$?; \
	  "$$RSCLIP_VENV/bin/python" tools/cluster.py stop --pg $(PG) --name itest >/dev/null; exit $$rc

test: lint unit pgtest itest
	@echo "all tests passed on PostgreSQL $(PG)"

# The server users get: rsclip preloaded, encoders in the shared inference workers (one model
# copy for every connection). INFERENCE=backend runs them in each backend instead.
INFERENCE ?= worker
server: install
	@$(PY) tools/cluster.py start --pg $(PG) --name server --set rsclip.inference=$(INFERENCE)

stop:
	@$(PY) tools/cluster.py stop --pg $(PG) --name server

demo: server
	@$(PY) tools/demo.py "$$($(PY) tools/cluster.py uri --pg $(PG) --name server)"

# Exact top-10 search: rsclip vs pgvector in the same PG18 server. ROWS=1000000 for the big run.
ROWS ?= 100000
BENCH_SHARED_BUFFERS ?= 4GB
BENCH_MWM ?= 2GB
BACKFILL_ROWS ?= 10000
BACKFILL_MODEL ?= fixture
BACKFILL_BATCH ?= 32
BACKFILL_THREADS ?= 1
BACKFILL_REPEAT ?= 3
bench: install
	@$(PY) tools/cluster.py start --pg 18 --name bench --port 25518 --set shared_buffers=$(BENCH_SHARED_BUFFERS) >/dev/null
	@$(PY) bench/exact_search.py --uri postgresql://postgres@127.0.0.1:25518/postgres --rows $(ROWS)

# Approximate search: rsclip index vs pgvector HNSW / IVFFlat (QPS-recall curves, build time,
# size; table + PNG in bench/results/). ROWS=1000000 for the by-hand large run.
# BENCH_DATA picks the data sets (real: all-MiniLM-L6-v2 sentence embeddings, made first if missing).
BENCH_DATA ?= real,clustered,uniform
bench-index: install $(if $(findstring real,$(BENCH_DATA)),real-embeddings)
	@$(ENV) "$$RSCLIP_VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$$RSCLIP_VENV/bin/pip" install -q matplotlib==3.10.8
	@$(PY) tools/cluster.py start --pg 18 --name bench --port 25518 --set shared_buffers=$(BENCH_SHARED_BUFFERS) >/dev/null
	@$(PY) bench/index.py --uri postgresql://postgres@127.0.0.1:25518/postgres --rows $(ROWS) --maintenance-work-mem $(BENCH_MWM) --data $(BENCH_DATA)

# Real sentence embeddings (bench/real_embeddings.py): resumable chunks under local/real-embeddings;
# the 100k set takes about 15 minutes on 2 cores, the 1M set hours (run it in the background).
REAL_ROWS ?= $(ROWS)
real-embeddings: export-env
	@$(ENV) $(EXPORT_PY) bench/real_embeddings.py embed --rows $(REAL_ROWS)

# Backend mode vs shared inference workers (rsclip.inference) in one run: memory per connection
# (smaps_rollup), throughput at 1/2/8/32 clients, lone-text latency. CONC_MODEL=git-rsclip-base
# runs the real architecture (random weights; exported first if missing), else the fixture.
CONC_MODEL ?= fixture
CONC_ARGS ?=
bench-concurrency: install $(if $(filter git-rsclip-base,$(CONC_MODEL)),base-model)
	@$(PY) tools/cluster.py stop --name benchconc >/dev/null 2>&1 || true
	@$(PY) tools/cluster.py start --pg 18 --name benchconc --port 25519 --set max_connections=100 \
	  --set rsclip.inference_workers=2 >/dev/null
	@$(PY) bench/concurrency.py --uri postgresql://postgres@127.0.0.1:25519/postgres \
	  $(if $(filter git-rsclip-base,$(CONC_MODEL)),--model-path "$$RSCLIP_LOCAL/models/git-rsclip-base-random" --backend-max-connections 8) $(CONC_ARGS)

# Text-query latency through the result cache: uncached, LRU hit, table hit (p50/p99).
bench-cache: install
	@$(PY) tools/cluster.py start --pg 18 --name bench --port 25518 --set shared_buffers=$(BENCH_SHARED_BUFFERS) >/dev/null
	@$(PY) bench/cache.py --uri postgresql://postgres@127.0.0.1:25518/postgres

# Backfill throughput: rsclip_backfill vs bare batched session.run vs per-row UPDATE.
# BACKFILL_MODEL=git-rsclip-base runs it on the real architecture (random weights), e.g.
#   make bench-backfill BACKFILL_MODEL=git-rsclip-base BACKFILL_ROWS=1000 BACKFILL_BATCH=16 BACKFILL_THREADS=2 BACKFILL_REPEAT=1
bench-backfill: install $(if $(filter git-rsclip-base,$(BACKFILL_MODEL)),base-model)
	@$(PY) tools/cluster.py start --pg 18 --name bench --port 25518 --set shared_buffers=$(BENCH_SHARED_BUFFERS) \
	  --set rsclip.intra_op_threads=$(BACKFILL_THREADS) >/dev/null
	@$(PY) bench/backfill.py --uri postgresql://postgres@127.0.0.1:25518/postgres --rows $(BACKFILL_ROWS) \
	  --batch $(BACKFILL_BATCH) --threads $(BACKFILL_THREADS) --repeat $(BACKFILL_REPEAT) \
	  $(if $(filter git-rsclip-base,$(BACKFILL_MODEL)),--model-path "$$RSCLIP_LOCAL/models/git-rsclip-base-random")

# Encoding throughput: rsclip vs a Python pipeline vs bare ONNX Runtime, on the fixture and on
# the git-rsclip-base architecture with random weights (exported on first use, not committed).
EXPORT_PY := "$$RSCLIP_LOCAL/venv-export/bin/python"
bench-encode: install base-model
	@$(PY) tools/cluster.py start --pg 18 --name bench --port 25518 >/dev/null
	@$(ENV) $(EXPORT_PY) bench/encode.py --uri postgresql://postgres@127.0.0.1:25518/postgres --model-dir "$$RSCLIP_LOCAL/models/tiny-siglip" --images 64
	@$(ENV) $(EXPORT_PY) bench/encode.py --uri postgresql://postgres@127.0.0.1:25518/postgres --model-dir "$$RSCLIP_LOCAL/models/git-rsclip-base-random" --images 16 --texts 32 --batches 1,8

# The git-rsclip-base architecture with random weights (no hub here), exported once into local/.
base-model: export-env
	@$(ENV) [ -f "$$RSCLIP_LOCAL/models/git-rsclip-base-random/rsclip.json" ] || \
	  $(EXPORT_PY) tools/export_model.py --random-weights git-rsclip-base --out "$$RSCLIP_LOCAL/models/git-rsclip-base-random"

export-env:
	@$(ENV) [ -x "$$RSCLIP_LOCAL/venv-export/bin/python" ] && \
	  [ "$$(cat "$$RSCLIP_LOCAL/venv-export/.req" 2>/dev/null)" = "$$(sha256sum tools/requirements-export.txt)" ] || \
	  { python3 -m venv "$$RSCLIP_LOCAL/venv-export" && "$$RSCLIP_LOCAL/venv-export/bin/pip" install -q -r tools/requirements-export.txt && \
	    sha256sum tools/requirements-export.txt > "$$RSCLIP_LOCAL/venv-export/.req"; }

# Regenerates the committed test fixture (needs tools/requirements-export.txt: torch etc.).
fixture: export-env
	@$(ENV) $(EXPORT_PY) tools/export_model.py --tiny-random --out tests/fixtures/tiny-siglip
	@$(ENV) $(EXPORT_PY) tools/export_model.py --tiny-random --precision fp16 --out tests/fixtures/tiny-siglip-fp16

fuzz: setup
	@bash fuzz/run.sh $(FUZZ_SECONDS)

clean:
	-@$(PY) tools/cluster.py stop --pg 18 --name server >/dev/null 2>&1
	-@$(PY) tools/cluster.py stop --pg 15 --name server >/dev/null 2>&1
	cargo clean
