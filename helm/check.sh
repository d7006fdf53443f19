#!/usr/bin/env bash
# Checks the Helm chart offline: the values table of its README is current (helm/values_table.py
# --check: every value has a comment), helm lint, helm template with the minimal install's values,
# a production-like values file (GPU, 3 policy replicas, ingress, HPA, NetworkPolicy,
# ServiceMonitor), the same with the judge of its own model (a constitution, publishing), the
# minimal values with the judge through the policy and NetworkPolicies, and each example of
# examples/ (CPU dev cluster with the local Kafka, one shared GPU, a GPU pool with the policy's
# HPA), then strict schema validation of every rendered manifest
# with kubeconform against schemas exported from the kubernetes-validate package
# (helm/k8s_schemas.py) and the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs (from
# its Go module). The renders that expect the Prometheus Operator pass
# `--api-versions monitoring.coreos.com/v1`, as a cluster with its CRDs would. Also checks that
# rendering refuses a gateway without an API-key Secret and a control plane without its token's
# Secret, and that the monitoring resources are left out when the cluster lacks their API. Exits
# non-zero on any problem.
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

echo ">> values table (helm/values_table.py --check)"
"$PYTHON" "$HERE/values_table.py" --check

echo ">> schemas: Kubernetes $KUBE_VERSIONS (kubernetes-validate), ServiceMonitor, PrometheusRule ($PROM_OPERATOR)"
# The module is checked against the Go checksum database like any `go install`.
PROM_DIR="$(cd "$OUT" && GOFLAGS=-mod=mod go mod download -json "$PROM_OPERATOR" \
  | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["Error"]) if "Error" in d else print(d["Dir"])')"
CRDS="$PROM_DIR/example/prometheus-operator-crd"
mapfile -t LOCATIONS < <("$PYTHON" "$HERE/k8s_schemas.py" "$SCHEMAS" $KUBE_VERSIONS \
  --crd "$CRDS/monitoring.coreos.com_servicemonitors.yaml" \
  --crd "$CRDS/monitoring.coreos.com_prometheusrules.yaml")

render() {  # render NAME [helm args...]: helm template into $OUT/NAME.yaml
  local name="$1"; shift
  helm template rlhf "$CHART" --namespace rlhf --kube-version "${KUBE_VERSIONS##* }" "$@" >"$OUT/$name.yaml"
}

echo ">> helm lint"
CONTROL=(--set controlPlane.existingSecret=rlhf-control)
GATEWAY=(--set gateway.apiKeys.existingSecret=rlhf-gateway-keys)
MINIMAL=("${CONTROL[@]}" "${GATEWAY[@]}")
OPERATOR=(--api-versions monitoring.coreos.com/v1)
PRODUCTION=(-f "$CHART/ci/production-values.yaml")
# The judge (off by default): its own model in a Triton sidecar, or through the policy (no sidecar).
# --set-json: `--set` would pass the confidences as strings, which the schema refuses.
JUDGE_MODEL=(--set judge.enabled=true --set judge.rubricFile=services/judge/constitutions/v1.yaml
  --set judge.publish=true --set-json judge.publishMinConfidence=0.5
  --set-json judge.annotationMaxConfidence=0.2)
JUDGE_POLICY=(--set judge.enabled=true,judge.throughPolicy=true,networkPolicy.enabled=true)
EXAMPLES=("$CHART"/examples/values-*.yaml)
[ "${#EXAMPLES[@]}" -eq 3 ] || { echo "check.sh: expected 3 examples, found ${EXAMPLES[*]}" >&2; exit 1; }
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${MINIMAL[@]}"
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${PRODUCTION[@]}"
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${PRODUCTION[@]}" "${JUDGE_MODEL[@]}"
helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" "${MINIMAL[@]}" "${JUDGE_POLICY[@]}"
for example in "${EXAMPLES[@]}"; do
  helm lint --strict "$CHART" --kube-version "${KUBE_VERSIONS##* }" -f "$example" "${MINIMAL[@]}"
done

echo ">> helm template"
render minimal "${MINIMAL[@]}"
render production "${PRODUCTION[@]}" "${OPERATOR[@]}"
render judge-model "${PRODUCTION[@]}" "${JUDGE_MODEL[@]}" "${OPERATOR[@]}"
render judge-policy "${MINIMAL[@]}" "${JUDGE_POLICY[@]}"
grep -q "name: rlhf-rlhf-platform-judge$" "$OUT/judge-model.yaml" \
  || { echo "check.sh: judge.enabled=true rendered no judge" >&2; exit 1; }
if grep -q "rlhf-rlhf-platform-judge" "$OUT/production.yaml"; then
  echo "check.sh: the judge rendered while judge.enabled=false" >&2; exit 1
fi
render image-models "${MINIMAL[@]}" --set models.source=image --set gateway.enabled=true \
  --set serviceMonitor.enabled=true --set networkPolicy.enabled=true "${OPERATOR[@]}"
for example in "${EXAMPLES[@]}"; do
  name="$(basename "$example" .yaml)"
  render "$name" -f "$example" "${OPERATOR[@]}"
done
# Without the Prometheus Operator's API, the monitoring resources are left out, not refused.
render no-operator "${PRODUCTION[@]}" --set prometheusRule.enabled=true
if grep -Eq "^kind: (ServiceMonitor|PrometheusRule)$" "$OUT/no-operator.yaml"; then
  echo "check.sh: ServiceMonitor/PrometheusRule rendered without monitoring.coreos.com/v1" >&2; exit 1
fi
grep -q "^kind: ServiceMonitor$" "$OUT/production.yaml" \
  || { echo "check.sh: the production render lacks its ServiceMonitor" >&2; exit 1; }
rm "$OUT/no-operator.yaml"
must_fail() {  # must_fail VALUE [helm args...]: rendering without the Secret VALUE names must fail
  local value="$1"; shift
  if render no-secret "$@" 2>"$OUT/no-secret.err"; then
    echo "check.sh: rendering without $value must fail" >&2; exit 1
  fi
  grep -qF "$value is required" "$OUT/no-secret.err" \
    || { echo "check.sh: unexpected error without $value:" >&2; cat "$OUT/no-secret.err" >&2; exit 1; }
  rm "$OUT/no-secret.yaml" "$OUT/no-secret.err"
}
must_fail gateway.apiKeys.existingSecret "${CONTROL[@]}"
must_fail controlPlane.existingSecret "${GATEWAY[@]}"

echo ">> kubeconform -strict (offline)"
ARGS=()
for location in "${LOCATIONS[@]}"; do ARGS+=(-schema-location "$location"); done
for version in $KUBE_VERSIONS; do
  kubeconform -strict -summary -kubernetes-version "$version" "${ARGS[@]}" "$OUT"/*.yaml
done
echo ">> helm chart OK"
