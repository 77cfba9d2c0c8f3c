# Herald's front door. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
PIP ?= python3 -m pip
export PATH := $(HOME)/.cargo/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help deps build run test test-rust lint helm-check bench bench-noisy bench-slow-org soak chaos fuzz-api clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## install nats-server and redis-server when missing
	@scripts/install-deps.sh

build: ## build the five services (release)
	$(CARGO) build --release --bins

run: deps build ## start NATS, Redis and all five services locally; Ctrl-C stops
	@scripts/dev-stack.sh

test: deps test-rust fuzz-api helm-check ## install what is missing and run every test

# One test more than cores: the end-to-end tests spend much of their time
# waiting on their servers (on 2 cores, 3 at once took the suite from 325 s
# to 223 s, and it passed with 3 spinning shells beside 2).
TEST_THREADS ?= $(shell echo $$(( $$(nproc) + 1 )))

test-rust: ## unit, integration and end-to-end tests against real NATS and Redis
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast --test-threads $(TEST_THREADS); \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fuzz-api: ## property-based tests of the admin API against its OpenAPI document (schemathesis)
	@scripts/fuzz-api.sh

helm-check: ## lint, render and validate the Helm chart
	@$(PIP) install -q -r scripts/requirements-helm.txt
	python3 scripts/helm-check.py

BENCH_ARGS ?=
bench: deps build ## end-to-end benchmark (builds the services first); writes target/bench/result.json; BENCH_ARGS=--sync-always adds the sync-always pass
	$(CARGO) run --release -p herald-bench -- $(BENCH_ARGS)

SOAK_MINUTES ?= 20
NOISY_BURST ?= 30000
soak: deps build ## one slow (10 s) webhook beside a healthy one for SOAK_MINUTES (20); healthy p99 per minute
	$(CARGO) run --release -p herald-bench -- --soak-minutes $(SOAK_MINUTES)

bench-noisy: deps build ## one organization's burst of NOISY_BURST (30000) events beside another's 10 events/s; the other's p99 alone and beside
	$(CARGO) run --release -p herald-bench -- --noisy-burst $(NOISY_BURST)

SLOW_ORG_EVENTS ?= 300
bench-slow-org: deps build ## one organization's SLOW_ORG_EVENTS (300) events to 40 webhooks answering after 10 s beside another's 10 events/s; the other's p99 alone and beside
	$(CARGO) run --release -p herald-bench -- --slow-org $(SLOW_ORG_EVENTS)

chaos: deps build ## faults under load (kill -9 each replica, a NATS node, Redis) on a 3-node NATS; writes target/bench/chaos.json
	$(CARGO) run --release -p herald-bench -- --chaos

clean: ## remove build output and the dev stack's data
	$(CARGO) clean
	rm -rf .herald
