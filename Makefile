# nicwarden: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
# rustup installs cargo under ~/.cargo/bin, which a non-login shell may not have on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: all deps build test demo tour lint fmt clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --release --bin nicwarden

# The whole suite: unit, property, integration and end-to-end tests.
test:
	@NICWARDEN_DEPS=test scripts/deps.sh
	$(CARGO) test --workspace --all-targets --no-fail-fast

# The whole system on real packets in network namespaces (needs root).
demo: build
	target/release/nicwarden demo

# The control plane on loopback, command by command (no root needed).
tour: build
	scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
