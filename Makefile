# Marga developer commands. `make test` is the one test command, for people and for CI.
#
#   make test      build marga + mock-upstream, run every Rust test, then the SDK tests
#   make test-rust cargo test --workspace (and the e2e suite on Postgres if MARGA_TEST_POSTGRES=1)
#   make test-sdk  the Python tests in tests/sdk (official openai SDK against the real binary)
#   make build     release build of marga and mock-upstream
#   make build-pgo profile-guided, BOLT-laid-out marga (bench/pgo.sh): target/pgo/marga, for production
#   make serve     run the gateway (release): make serve ARGS="--listen 0.0.0.0:8080"
#   make bench     bench/run.sh
#   make lint      clippy on every target, warnings are errors
#   make venv      (re)create .venv from tests/sdk/requirements.txt if it changed
#
# The SDK tests run the binaries of SDK_PROFILE (default: dev, the profile `cargo test`
# already compiles every dependency in, so a cold CI run compiles the world once instead of
# twice: measured on 2 cores, the release build alone costs ~650 CPU-s against ~120 CPU-s
# for the dev binaries on top of the test build). `make test SDK_PROFILE=release` runs them
# against the release build instead.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

CARGO ?= cargo
PYTHON ?= python3
VENV ?= .venv
SDK_PROFILE ?= dev
PYTEST_ARGS ?= -q
# Passed to the Rust test harness: one dot per test; failures are still shown in full.
RUST_TEST_ARGS ?= --quiet
ARGS ?=

TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
ifeq ($(SDK_PROFILE),dev)
  SDK_BIN_DIR := $(TARGET_DIR)/debug
else
  SDK_BIN_DIR := $(TARGET_DIR)/$(SDK_PROFILE)
endif
VENV_PY := $(VENV)/bin/python
REQUIREMENTS := tests/sdk/requirements.txt
REQUIREMENTS_STAMP := $(VENV)/.requirements.installed

say = @printf '\n\033[1m==> %s\033[0m\n' "$(1)"

.PHONY: help test test-rust test-sdk sdk-bins build build-pgo serve bench lint venv clean-venv

help:
	@sed -n '3,11p' Makefile | sed 's/^# \{0,1\}//'

## test: every test there is; exits non-zero if any fails. Both suites run even if the
## first fails, so one run shows every failure.
test: sdk-bins venv
	@status=0; \
	$(MAKE) test-rust || status=1; \
	$(MAKE) test-sdk-only || status=1; \
	if [ $$status -ne 0 ]; then printf '\n\033[1;31mmake test: FAILED (see above)\033[0m\n'; fi; \
	exit $$status

## test-rust: the e2e suite (crates/gateway/tests/api) runs on SQLite in the workspace pass
## (MARGA_E2E_POSTGRES=0, even though the store tests use Postgres when MARGA_TEST_POSTGRES=1)
## and, when MARGA_TEST_POSTGRES=1 (as .ci/run sets it), once more on Postgres.
test-rust:
	$(call say,cargo test --workspace)
	@status=0; \
	MARGA_E2E_POSTGRES=0 $(CARGO) test --workspace -- $(RUST_TEST_ARGS) || status=1; \
	if [ "$${MARGA_TEST_POSTGRES:-}" = 1 ]; then \
		printf '\n\033[1m==> %s\033[0m\n' "MARGA_E2E_POSTGRES=1 cargo test -p marga-gateway --test api"; \
		MARGA_E2E_POSTGRES=1 $(CARGO) test -p marga-gateway --test api -- $(RUST_TEST_ARGS) || status=1; \
	fi; \
	exit $$status

test-sdk: sdk-bins venv
	@$(MAKE) test-sdk-only

.PHONY: test-sdk-only
test-sdk-only:
	$(call say,pytest tests/sdk (binaries: $(SDK_BIN_DIR)))
	MARGA_BIN="$(abspath $(SDK_BIN_DIR))/marga" MOCK_BIN="$(abspath $(SDK_BIN_DIR))/mock-upstream" \
		$(VENV_PY) -m pytest tests/sdk $(PYTEST_ARGS)

sdk-bins:
	$(call say,cargo build --profile $(SDK_PROFILE) -p marga-gateway -p mock-upstream)
	$(CARGO) build --profile $(SDK_PROFILE) -p marga-gateway -p mock-upstream

build:
	$(CARGO) build --release -p marga-gateway -p mock-upstream

build-pgo:
	bash bench/pgo.sh

serve:
	$(CARGO) run --release -p marga-gateway -- serve $(ARGS)

bench:
	bash bench/run.sh $(ARGS)

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## venv: created when missing or broken, reinstalled when the requirements file differs from
## the copy saved at the last successful install.
venv:
	@if ! "$(VENV_PY)" -c 'import sys' >/dev/null 2>&1; then \
		printf '\n\033[1m==> creating %s\033[0m\n' "$(VENV)"; \
		rm -rf "$(VENV)"; \
		$(PYTHON) -m venv "$(VENV)"; \
	fi
	@if ! cmp -s "$(REQUIREMENTS)" "$(REQUIREMENTS_STAMP)"; then \
		printf '\n\033[1m==> installing %s into %s\033[0m\n' "$(REQUIREMENTS)" "$(VENV)"; \
		"$(VENV_PY)" -m pip install --quiet --disable-pip-version-check -r "$(REQUIREMENTS)"; \
		cp "$(REQUIREMENTS)" "$(REQUIREMENTS_STAMP)"; \
	fi

clean-venv:
	rm -rf "$(VENV)"
