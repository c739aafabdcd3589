#!/usr/bin/env bash
# Builds the lab's pinned Kubernetes binaries from the Go module proxy and caches them outside
# the repo (default ~/.cache/harness-mesh), so later runs on the same machine reuse them.
#
#   e2e/lab/build-binaries.sh [NAME ...]   (default: etcd kube-apiserver kubectl)
#
# NAME: etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy helm
#       actionlint coredns
#
# Versions live in e2e/lab/versions.env. Each binary is built in its own throwaway consumer
# module: k8s.io/kubernetes cannot be required as-is because its go.mod points every
# k8s.io/* staging module at ./staging, so the consumer module pins each of them with
# `replace` to the matching v0.X.Y tag. The version ldflags are set so `/version` and
# `--version` tell the truth.
#
# Prints the path of each binary, one per line, on stdout. Progress goes to stderr, a few lines a
# binary (which one, about how long, a heartbeat every 30 s, how long it took); the Go tool's
# own output goes to $cache/logs/NAME.log, and its last lines are shown when a build fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${HARNESS_MESH_CACHE:-$HOME/.cache/harness-mesh}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[build-binaries] %s\n' "$*" >&2; }

# About how long a cold build of each binary takes on a 2-core machine with empty Go caches, in
# this order (measured: kube-apiserver 13m28s while a cargo build ran beside it; the later k8s
# binaries reuse the modules and packages the first one fetched; kube-proxy after the kubelet
# 27 s; coredns 4m36s with its modules not yet downloaded, while a cargo build ran beside it).
declare -A typical=(
  [etcd]="about 1 min" [kube-apiserver]="8-14 min" [kubectl]="1-2 min" [helm]="2-3 min"
  [kubelet]="3-7 min" [kube-controller-manager]="1-2 min" [kube-scheduler]="under 1 min"
  [kube-proxy]="under 1 min" [actionlint]="under 1 min" [coredns]="4-5 min"
)

# logged NAME CMD...: runs CMD (a build) with its output in $cache/logs/$1.log, printing a line every 30 s so a
# long first run is not silent; on failure shows the log's last lines and exits.
logged() {
  local name="$1" log_file="$cache/logs/$1.log" start=$SECONDS pid rc=0 tick=0
  shift
  mkdir -p "$cache/logs"
  "$@" >"$log_file" 2>&1 </dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    tick=$((tick + 1))
    if [ $((tick % 30)) = 0 ] && kill -0 "$pid" 2>/dev/null; then
      log "  ... still building $name: $(elapsed $start) so far (typically ${typical[$name]:-a few minutes})"
    fi
  done
  wait "$pid" || rc=$?
  if [ "$rc" != 0 ]; then
    log "building $name failed after $(elapsed $start) (exit $rc); the last lines of $log_file:"
    tail -n 25 "$log_file" >&2
    exit 1
  fi
  log "built $name in $(elapsed $start)"
}

elapsed() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# Announces a build: what, where to, about how long, and where its output goes.
announce() { # $1 = name, $2 = version, $3 = output path
  log "building $1 $2 from the Go module proxy (once per machine; a cold build takes ${typical[$1]:-a few minutes} on 2 cores)"
  log "  -> $3 (output: $cache/logs/$1.log)"
}

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
  } >"$dir/go.mod.tmp"
  mv "$dir/go.mod.tmp" "$dir/go.mod"
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

go_k8s() { # $1 = consumer module, $2 = command name, $3 = output
  [ -f "$1/go.mod" ] || k8s_consumer_module "$1"
  cd "$1" && go get "k8s.io/kubernetes/cmd/$2@$K8S_VERSION" \
    && go build -trimpath -ldflags "$(k8s_ldflags)" -o "$3" "k8s.io/kubernetes/cmd/$2"
}

build_k8s() { # $1 = command name under k8s.io/kubernetes/cmd
  local name="$1" out="$cache/k8s-$K8S_VERSION/$1" work="$cache/src/k8s-$K8S_VERSION"
  if [ -x "$out" ]; then echo "$out"; return; fi
  announce "$name" "$K8S_VERSION" "$out"
  mkdir -p "$work" "$(dirname "$out")"
  logged "$name" go_k8s "$work" "$name" "$out.tmp"
  mv "$out.tmp" "$out"
  echo "$out"
}

go_etcd() { # $1 = module, $2 = output
  cd "$1" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" "go.etcd.io/etcd/api/v3@$ETCD_VERSION" \
    && go mod tidy \
    && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" -o "$2" .
}

build_etcd() {
  local out="$cache/etcd-$ETCD_VERSION/etcd" work="$cache/src/etcd-$ETCD_VERSION"
  if [ -x "$out" ]; then echo "$out"; return; fi
  announce etcd "$ETCD_VERSION" "$out"
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
  logged etcd go_etcd "$work" "$out.tmp"
  mv "$out.tmp" "$out"
  echo "$out"
}

go_tool() { # $1 = module, $2 = package@version, $3 = output, $4 = ldflags
  cd "$1" && go get "$2" && go build -trimpath -ldflags "$4" -o "$3" "${2%@*}"
}

# build_tool NAME VERSION PACKAGE LDFLAGS: a Go command built from its own module at VERSION in a
# throwaway consumer module (helm, actionlint, coredns).
build_tool() {
  local name="$1" version="$2" out="$cache/$1-$2/$1" work="$cache/src/$1-$2"
  if [ -x "$out" ]; then echo "$out"; return; fi
  announce "$name" "$version" "$out"
  mkdir -p "$work" "$(dirname "$out")"
  printf 'module harness-mesh.dev/%sbuild\n\ngo 1.26\n' "$name" >"$work/go.mod"
  logged "$name" go_tool "$work" "$3@$version" "$out.tmp" "-s -w $4"
  mv "$out.tmp" "$out"
  echo "$out"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kube-apiserver kubectl)
# Say up front what a first run is in for, and where the results are kept.
missing=()
for t in "${targets[@]}"; do
  case "$t" in
    etcd) [ -x "$cache/etcd-$ETCD_VERSION/etcd" ] || missing+=("$t") ;;
    helm) [ -x "$cache/helm-$HELM_VERSION/helm" ] || missing+=("$t") ;;
    actionlint) [ -x "$cache/actionlint-$ACTIONLINT_VERSION/actionlint" ] || missing+=("$t") ;;
    coredns) [ -x "$cache/coredns-$COREDNS_VERSION/coredns" ] || missing+=("$t") ;;
    kube-apiserver | kubectl | kube-controller-manager | kube-scheduler | kubelet | kube-proxy)
      [ -x "$cache/k8s-$K8S_VERSION/$t" ] || missing+=("$t") ;;
    *) log "unknown binary '$t' (known: etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy helm actionlint coredns)"; exit 2 ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  log "${#missing[@]} of ${#targets[@]} binaries are not cached yet: ${missing[*]}"
  log "building them once into $cache (\$HARNESS_MESH_CACHE); later runs reuse them"
fi
mkdir -p "$cache"
for t in "${targets[@]}"; do
  # Two labs (e2e/lab/ns.sh) may ask for the same binary at once: one builds, the other waits
  # for it and then finds it cached.
  exec {lock}>"$cache/.build-$t.lock"
  if ! flock -n "$lock"; then
    log "waiting for another build of $t to finish"
    flock "$lock"
  fi
  case "$t" in
    etcd) build_etcd ;;
    helm) build_tool helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
      "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
    actionlint) # the GitHub Actions workflow linter that `make lint` runs
      build_tool actionlint "$ACTIONLINT_VERSION" github.com/rhysd/actionlint/cmd/actionlint \
        "-X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION" ;;
    coredns) # the kubelet lab's cluster DNS; the plugins are CoreDNS's default set (plugin.cfg)
      build_tool coredns "$COREDNS_VERSION" github.com/coredns/coredns \
        "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" ;;
    *) build_k8s "$t" ;;
  esac
  exec {lock}>&-
done
