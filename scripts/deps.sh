#!/usr/bin/env bash
# Installs the system packages nicwarden's build, tests and demo need, if they are missing.
# Safe to run repeatedly; needs root (apt) only when something is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need+=(gcc)
have make || need+=(make)
have curl || need+=(curl)
have ip || need+=(iproute2)
have tc || need+=(iproute2)
# nftables: the agent's `tc` datapath counts and caps transfer volume with nft quotas.
have nft || need+=(nftables)
# clang + libbpf headers: the eBPF datapath's programs are C, compiled at build time.
have clang || need+=(clang)
[[ -f /usr/include/bpf/bpf_helpers.h ]] || need+=(libbpf-dev)
have python3 || need+=(python3)
# The dashboard's browser tests (make test only): headless Chromium driven by
# playwright-core from npm (tests/browser).
if [[ ${NICWARDEN_DEPS:-} == test ]]; then
  have chromium || need+=(chromium)
  have node || need+=(nodejs)
  have npm || need+=(npm)
fi

if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: missing packages: ${need[*]}; run as root (apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi

if ! have cargo; then
  echo "deps: cargo (Rust >= 1.85) is required: https://rustup.rs (Debian 12's packaged Rust is too old)" >&2
  exit 1
fi

if [[ ${NICWARDEN_DEPS:-} == test ]]; then
  # npm ci is exact (package-lock.json) and reinstalls only when the lock file changed.
  cd "$(dirname "$0")/.."
  stamp=tests/browser/node_modules/.nicwarden-lock
  if ! cmp -s tests/browser/package-lock.json "$stamp" 2>/dev/null; then
    echo "deps: installing the browser tests' npm packages (tests/browser)"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
    cp tests/browser/package-lock.json "$stamp"
  fi
fi
