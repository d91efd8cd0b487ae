#!/usr/bin/env bash
# Server reflection and health as Python's grpcio clients read them (grpcio, grpcio-reflection and
# grpcio-health-checking from PyPI): starts a gateway on mock APNs and FCM
# (`examples/mock_gateway.rs`) and runs scripts/grpcio_reflection_check.py against its gRPC port:
# list the services over `grpc.reflection.v1alpha`, resolve `pushgate.v1.PushGateway` to its file
# descriptor and its methods, and ask health for `pushgate.v1.PushGateway` and "".
# Fails (does not skip) when the Python packages are missing: run scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import grpc, grpc_reflection, grpc_health' >/dev/null 2>&1; then
  echo "grpcio-reflection: python3 with grpcio, grpcio-reflection and grpcio-health-checking not found:" >&2
  echo "run scripts/setup.sh (python3 -m pip install grpcio grpcio-reflection grpcio-health-checking)" >&2
  exit 1
fi

cargo build --quiet --locked --example mock_gateway
work="$(mktemp -d)"
target/debug/examples/mock_gateway --addr-file "$work/addr" --api-key "grpcio-reflection-key-0123456789" \
  >"$work/gateway.log" 2>&1 &
gateway=$!
cleanup() {
  kill "$gateway" 2>/dev/null || true
  wait "$gateway" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 300); do
  [ -s "$work/addr" ] && break
  if ! kill -0 "$gateway" 2>/dev/null; then
    cat "$work/gateway.log" >&2
    echo "the mock gateway exited before listening" >&2
    exit 1
  fi
  sleep 0.1
done
# shellcheck disable=SC1091
. "$work/addr"
status=0
python3 scripts/grpcio_reflection_check.py "$GRPC" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- gateway log ---" >&2
  tail -n 50 "$work/gateway.log" >&2
fi
exit "$status"
