#!/usr/bin/env bash
# Runs harness-mesh's end-to-end suite on a kind cluster, on a machine with Docker:
#
#   e2e/kind/run.sh [CARGO TEST ARGS...]      e.g. e2e/kind/run.sh --test mesh
#
# 1. builds the controller and agent images (images/build.sh, with docker),
# 2. creates the kind cluster $KIND_CLUSTER (default harness-mesh) from kind-config.yaml unless
#    it exists, and loads the images into it,
# 3. installs the tools the suite runs on nodes (wg, ping, socat, nft, tcpdump, iperf3) in each
#    node container,
# 4. installs the chart (release harness-mesh in namespace harness-mesh) and waits for it,
# 5. runs `cargo test -p harness-mesh-e2e` against it (see e2e/src/nodes.rs for the variables).
#
# Environment: KIND_CLUSTER, WIREGUARD (auto: the kernel's if the host has it, else
# userspace; or userspace|kernel), AGENT_PRIVILEGED=true where the runtime refuses /dev/net/tun
# to unprivileged pods, HELM / KIND / KUBECTL to pick binaries. The cluster is left running for
# the next run; remove it with `kind delete cluster --name harness-mesh`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cluster="${KIND_CLUSTER:-harness-mesh}"
namespace=harness-mesh
release=harness-mesh
tag=kind
registry=localhost/harness-mesh
kubeconfig="$repo/target/kind/$cluster.kubeconfig"
kind="${KIND:-kind}"
kubectl="${KUBECTL:-kubectl}"
helm="${HELM:-helm}"

log() { printf '[kind] %s\n' "$*" >&2; }
for tool in docker "$kind" "$kubectl" "$helm" cargo; do
  command -v "$tool" >/dev/null 2>&1 || { log "$tool is required (docker, kind, kubectl, helm, cargo)"; exit 2; }
done
case "$kubeconfig" in *[[:space:]]*) log "the repository path must not contain spaces: $repo"; exit 2 ;; esac

log "building the images"
built="$(BUILDER=docker REGISTRY="$registry" TAG="$tag" "$repo/images/build.sh")"
mapfile -t images <<<"$built"

mkdir -p "$(dirname "$kubeconfig")"
if ! "$kind" get clusters | grep -qx "$cluster"; then
  log "creating kind cluster $cluster"
  "$kind" create cluster --name "$cluster" --config "$here/kind-config.yaml" --kubeconfig "$kubeconfig" --wait 120s
fi
"$kind" export kubeconfig --name "$cluster" --kubeconfig "$kubeconfig" >&2
"$kind" load docker-image --name "$cluster" "${images[@]}" >&2

listed="$("$kind" get nodes --name "$cluster")"
mapfile -t nodes < <(sort <<<"$listed")
for node in "${nodes[@]}"; do
  log "node tools on $node"
  docker exec "$node" sh -c 'command -v wg && command -v socat && command -v iperf3 && command -v tcpdump' >/dev/null 2>&1 \
    || docker exec -e DEBIAN_FRONTEND=noninteractive "$node" sh -c 'apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends wireguard-tools socat iputils-ping nftables tcpdump iperf3 >/dev/null'
done

log "installing the chart"
"$helm" upgrade --install "$release" "$repo/charts/harness-mesh" --kubeconfig "$kubeconfig" \
  --namespace "$namespace" --create-namespace --wait --timeout 5m \
  --set controller.image.repository="$registry/mesh-controller" --set controller.image.tag="$tag" \
  --set controller.image.pullPolicy=Never \
  --set agent.image.repository="$registry/mesh-agent" --set agent.image.tag="$tag" \
  --set agent.image.pullPolicy=Never \
  --set agent.wireguard="${WIREGUARD:-auto}" --set agent.privileged="${AGENT_PRIVILEGED:-false}" \
  --set "controller.clusterCIDRs={10.244.0.0/16,10.96.0.0/16}" >&2

log "running the suite on ${nodes[*]}"
export HARNESS_MESH_KUBECONFIG="$kubeconfig"
HARNESS_MESH_NODES="$(IFS=,; echo "${nodes[*]}")"
export HARNESS_MESH_NODES
export HARNESS_MESH_NODE_EXEC='docker exec {node}'
export HARNESS_MESH_AGENT_RESTART="$kubectl --kubeconfig $kubeconfig -n $namespace delete pod --wait=true \
-l app.kubernetes.io/instance=$release,app.kubernetes.io/component=agent --field-selector spec.nodeName={node}"
export KUBECTL="$kubectl" HELM="$helm"
cd "$repo"
exec cargo test -p harness-mesh-e2e "$@"
