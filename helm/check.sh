#!/usr/bin/env bash
# Checks the Helm chart offline: helm lint, helm template with the minimal install's values and
# with a production-like values file (GPU, 3 policy replicas, ingress, HPA, NetworkPolicy,
# ServiceMonitor), then strict schema validation of every rendered manifest with kubeconform
# against schemas exported from the kubernetes-validate package (helm/k8s_schemas.py) and the
# Prometheus Operator's ServiceMonitor CRD (from its Go module). Also checks that rendering
# refuses a gateway without an API-key Secret. Exits non-zero on any problem.
#
#   helm/check.sh            # what `make helm-check` runs
#
# Needs on PATH (the Makefile puts them there): helm, kubeconform, go, and a python with the
# project's requirements (kubernetes-validate, PyYAML). Environment knobs: PYTHON, RLHF_CACHE,
# KUBE_VERSIONS (default "1.28.0 1.33.0": the oldest the chart supports and a recent one).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHART="$HERE/rlhf-platform"
PYTHON="${PYTHON:-python3}"
RLHF_CACHE="${RLHF_CACHE:-$HOME/.cache/rlhf-platform}"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.28.0 1.33.0}"
PROM_OPERATOR="github.com/prometheus-operator/prometheus-operator@v0.85.0"
SCHEMAS="$RLHF_CACHE/k8s-schemas"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

for tool in helm kubeconform go "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "check.sh: $tool not found on PATH (run make setup)" >&2; exit 2; }
done

echo ">> schemas: Kubernetes $KUBE_VERSIONS (kubernetes-validate), ServiceMonitor ($PROM_OPERATOR)"
# The module is checked against the Go checksum database like any `go install`.
PROM_DIR="$(cd "$OUT" && GOFLAGS=-mod=mod go mod download -json "$PROM_OPERATOR" \
  | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["Error"]) if "Error" in d else print(d["Dir"])')"
CRD="$PROM_DIR/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
mapfile -t LOCATIONS < <("$PYTHON" "$HERE/k8s_schemas.py" "$SCHEMAS" $KUBE_VERSIONS --crd "$CRD")

render() {  # render NAME [helm args...]: helm template into $OUT/NAME.yaml
  local name="$1"; shift
  helm template rlhf "$CHART" --namespace rlhf --kube-version "${KUBE_VERSIONS##* }" "$@" >"$OUT/$name.yaml"
}

echo ">> helm lint"
MINIMAL=(--set gateway.apiKeys.existingSecret=rlhf-gateway-keys)
PRODUCTION=(-f "$CHART/ci/production-values.yaml")
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${MINIMAL[@]}"
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${PRODUCTION[@]}"

echo ">> helm template"
render minimal "${MINIMAL[@]}"
render production "${PRODUCTION[@]}"
render image-models "${MINIMAL[@]}" --set models.source=image --set gateway.enabled=true \
  --set serviceMonitor.enabled=true --set networkPolicy.enabled=true
if render no-secret 2>"$OUT/no-secret.err"; then
  echo "check.sh: rendering without gateway.apiKeys.existingSecret must fail" >&2; exit 1
fi
grep -q "gateway.apiKeys.existingSecret is required" "$OUT/no-secret.err" \
  || { echo "check.sh: unexpected error without a gateway secret:" >&2; cat "$OUT/no-secret.err" >&2; exit 1; }
rm "$OUT/no-secret.yaml" "$OUT/no-secret.err"

echo ">> kubeconform -strict (offline)"
ARGS=()
for location in "${LOCATIONS[@]}"; do ARGS+=(-schema-location "$location"); done
for version in $KUBE_VERSIONS; do
  kubeconform -strict -summary -kubernetes-version "$version" "${ARGS[@]}" "$OUT"/*.yaml
done
echo ">> helm chart OK"
