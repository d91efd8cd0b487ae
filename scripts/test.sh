#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests of every workspace crate, against
# the mock providers and a real redis-server that the tests start on free ports; then the
# Kubernetes manifests, rendered and validated offline, the HTTP API under schemathesis, and
# reflection and health read by Python's grpcio clients.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
bash scripts/validate-k8s.sh
bash scripts/schemathesis.sh
bash scripts/grpcio-reflection.sh
# The fuzz targets, briefly (the stable tests above already replayed their seeds and past
# findings): only where the nightly toolchain and cargo-fuzz are installed.
if cargo +nightly --version >/dev/null 2>&1 && cargo +nightly fuzz --version >/dev/null 2>&1; then
  bash scripts/fuzz.sh "${PUSHGATE_FUZZ_SECONDS:-20}"
else
  echo "fuzzing SKIPPED: needs the nightly toolchain and cargo-fuzz (scripts/setup.sh installs cargo-fuzz when nightly is present)"
fi
