#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests of every workspace crate, against
# the mock providers and a real redis-server that the tests start on free ports; then the
# Kubernetes manifests, rendered and validated offline, and the HTTP API under schemathesis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
bash scripts/validate-k8s.sh
bash scripts/schemathesis.sh
