#!/usr/bin/env bash
# Builds the lab's pinned Kubernetes binaries from the Go module proxy and caches them outside
# the repo (default ~/.cache/harness-mesh), so later runs on the same machine reuse them.
#
#   e2e/lab/build-binaries.sh [kube-apiserver|kubectl|etcd|helm ...]   (default: all of them)
#
# Versions live in e2e/lab/versions.env. Each binary is built in its own throwaway consumer
# module: k8s.io/kubernetes cannot be required as-is because its go.mod points every
# k8s.io/* staging module at ./staging, so the consumer module pins each of them with
# `replace` to the matching v0.X.Y tag. The version ldflags are set so `/version` and
# `--version` tell the truth.
#
# Prints the path of each binary, one per line, on stdout; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${HARNESS_MESH_CACHE:-$HOME/.cache/harness-mesh}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[build-binaries] %s\n' "$*" >&2; }

# Writes a consumer go.mod for k8s.io/kubernetes@$K8S_VERSION into $1.
k8s_consumer_module() {
  local dir="$1" upstream staging_version
  upstream="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [ -f "$upstream" ] || { log "could not download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
  staging_version="v0.${K8S_VERSION#v1.}"
  {
    echo "module harness-mesh.dev/labbuild"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$upstream"
    echo ")"
  } >"$dir/go.mod"
}

k8s_ldflags() {
  local major minor pkg flags=""
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    flags+=" -X $pkg.gitCommit=0000000000000000000000000000000000000000"
  done
  echo "-s -w$flags"
}

build_k8s() { # $1 = command name under k8s.io/kubernetes/cmd
  local name="$1" out="$cache/k8s-$K8S_VERSION/$1" work="$cache/src/k8s-$K8S_VERSION"
  if [ -x "$out" ]; then echo "$out"; return; fi
  log "building $name $K8S_VERSION (cold builds take several minutes on 2 cores)"
  mkdir -p "$work" "$(dirname "$out")"
  [ -f "$work/go.mod" ] || k8s_consumer_module "$work"
  (cd "$work" && go get "k8s.io/kubernetes/cmd/$name@$K8S_VERSION" >&2 \
    && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$out.tmp" "k8s.io/kubernetes/cmd/$name")
  mv "$out.tmp" "$out"
  echo "$out"
}

build_etcd() {
  local out="$cache/etcd-$ETCD_VERSION/etcd" work="$cache/src/etcd-$ETCD_VERSION"
  if [ -x "$out" ]; then echo "$out"; return; fi
  log "building etcd $ETCD_VERSION"
  mkdir -p "$work" "$(dirname "$out")"
  # The same entry point as etcd's own main.go.
  cat >"$work/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  printf 'module harness-mesh.dev/etcdbuild\n\ngo 1.26\n' >"$work/go.mod"
  (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "go.etcd.io/etcd/api/v3@$ETCD_VERSION" >&2 \
    && go mod tidy >&2 \
    && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
  echo "$out"
}

build_helm() {
  local out="$cache/helm-$HELM_VERSION/helm" work="$cache/src/helm-$HELM_VERSION"
  if [ -x "$out" ]; then echo "$out"; return; fi
  log "building helm $HELM_VERSION"
  mkdir -p "$work" "$(dirname "$out")"
  printf 'module harness-mesh.dev/helmbuild\n\ngo 1.26\n' >"$work/go.mod"
  (cd "$work" && go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2 \
    && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      -o "$out.tmp" helm.sh/helm/v3/cmd/helm)
  mv "$out.tmp" "$out"
  echo "$out"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kube-apiserver kubectl)
for t in "${targets[@]}"; do
  case "$t" in
    etcd) build_etcd ;;
    helm) build_helm ;;
    kube-apiserver | kubectl | kube-controller-manager | kube-scheduler | kubelet) build_k8s "$t" ;;
    *) log "unknown binary '$t' (known: etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet helm)"; exit 2 ;;
  esac
done
