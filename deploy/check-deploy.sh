#!/usr/bin/env bash
# Checks the deployment files offline, as .ci/run does (deploy/test.sh):
#  - deploy/k8s rendered with kustomize (`kubectl kustomize`; helm is not in the registries this machine
#    reaches) and every resource validated against the Kubernetes 1.32 schemas, strictly (unknown fields
#    refused; PyPI's kubernetes-validate), the KEDA ScaledObject against KEDA's CRD schema (npm's
#    @kubernetes-models/keda), and the expected resources present;
#  - deploy/compose.yaml against the Compose specification's schema (PyPI's check-jsonschema).
# The Dockerfiles are not built here (no container runtime); running any of it needs a cluster or Docker.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${STYLEFARM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/stylefarm}
venv="$repo/.stylefarm/venv"
log() { printf 'check-deploy: %s\n' "$*" >&2; }

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
apt_get() {
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "$@" || { $sudo apt-get update -q && $sudo apt-get install -y -q "$@"; }
}
# (Debian's own archive has no current kubectl: Kubernetes' apt repository, pkgs.k8s.io, has)
command -v kubectl >/dev/null || apt_get kubectl || {
    log "kubectl is needed for \`kubectl kustomize\` (1.27 or later): install it from pkgs.k8s.io"
    exit 1
}
command -v npm >/dev/null || apt_get nodejs npm

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

kubectl kustomize "$repo/deploy/k8s" >"$out/k8s.yaml"
kinds=$(grep -E '^kind: ' "$out/k8s.yaml" | sort | uniq -c | tr -s ' ' | tr '\n' ';')
expected=' 1 kind: ConfigMap; 2 kind: Deployment; 1 kind: Namespace; 1 kind: ScaledObject; 1 kind: Secret; 2 kind: Service; 1 kind: StatefulSet;'
[ "$kinds" = "$expected" ] || { log "rendered kinds: $kinds; expected: $expected"; exit 1; }
# (it knows no CRD: its warning for the ScaledObject is expected, checked below against KEDA's schema)
if ! "$venv/bin/kubernetes-validate" --strict --quiet -k 1.32.0 "$out/k8s.yaml" >"$out/validate.log" 2>&1; then
    cat "$out/validate.log" >&2
    log "kubernetes-validate refused deploy/k8s"
    exit 1
fi
grep -v "Couldn't find schema for kind ScaledObject" "$out/validate.log" >&2 || true

keda="$home/npm/keda-2.0.0"
if [ ! -f "$keda/.ready" ]; then
    log "installing @kubernetes-models/keda 2.0.0 and js-yaml 4.1.0 from npm into $keda"
    mkdir -p "$keda"
    npm install --silent --no-audit --no-fund --prefix "$keda" @kubernetes-models/keda@2.0.0 js-yaml@4.1.0
    touch "$keda/.ready"
fi
cp "$repo/deploy/check-keda.mjs" "$keda/check-keda.mjs"
node "$keda/check-keda.mjs" "$out/k8s.yaml"

"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$repo/deploy/compose.yaml"
log "deploy/k8s (kustomize, Kubernetes 1.32 and KEDA schemas) and deploy/compose.yaml (Compose schema): ok"
