#!/usr/bin/env bash
# `make demo`: on the running lab (make lab-up starts it with 3 nodes), put a service on node 2
# behind a MeshService, wait for the mesh to converge, and show it working: the objects, a
# node's WireGuard device, a ping over the mesh, and the service reached from the other nodes on
# its listed port but not on another one. Everything stays inside the lab's namespaces.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lab="$here/lab.sh"
kubectl=("$repo/.lab/bin/kubectl" --kubeconfig "$repo/.lab/kubeconfig")
host=hm-node-2

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
on() { "$lab" exec "$@"; }

"${kubectl[@]}" apply --server-side --field-manager=harness-mesh-demo -f - >/dev/null <<EOF2
apiVersion: mesh.harness.dev/v1alpha1
kind: MeshService
metadata: {name: hello, namespace: default}
spec:
  node: $host
  network: {type: mesh, ports: [8080]}
EOF2

# The process behind the service: a tiny TCP server on node 2, on ports 8080 (listed) and 8081
# (not listed), for an hour or until `make lab-down`.
for port in 8080 8081; do
  setsid nohup "$lab" exec "$host" -- timeout 3600 socat "TCP-LISTEN:$port,reuseaddr,fork" \
    "SYSTEM:echo hello from $host port $port" </dev/null >/dev/null 2>&1 &
done

# Each step below checks its outcome and stops the demo with the reason when the mesh does not
# do what it shows (so `make demo` fails, and CI runs it before `make test`).
fail() {
  printf '\nmake demo failed: %s\n' "$*" >&2
  "$repo/target/debug/meshctl" --kubeconfig "$repo/.lab/kubeconfig" status >&2 || true
  exit 1
}

# Connected's message is "K of K peers reachable" when every peer answers.
all_reachable() { [[ "$1" =~ ^([0-9]+)\ of\ ([0-9]+)\ peers\ reachable ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; }

echo 'waiting until every node reports all its peers reachable (at most 60 s) ...'
ip=""
for _ in $(seq 1 120); do
  ok=0
  for n in 1 2 3; do
    msg="$("${kubectl[@]}" get mn "hm-node-$n" -o jsonpath='{.status.conditions[?(@.type=="Connected")].message}' 2>/dev/null || true)"
    all_reachable "$msg" && ok=$((ok + 1))
  done
  ip="$("${kubectl[@]}" get ms hello -o jsonpath='{.status.meshIP}' 2>/dev/null || true)"
  [ "$ok" = 3 ] && [ -n "$ip" ] && break
  sleep 0.5
done
[ "$ok" = 3 ] || fail "after 60 s only $ok of 3 nodes report all their peers reachable"
[ -n "$ip" ] || fail "MeshService default/hello has no mesh IP after 60 s (kubectl describe ms hello)"
node3="$("${kubectl[@]}" get mn hm-node-3 -o jsonpath='{.status.meshIP}')"
node1="$("${kubectl[@]}" get mn hm-node-1 -o jsonpath='{.status.meshIP}')"
say 'kubectl get mesh -A'
"${kubectl[@]}" get mesh -A
say "kubectl get mn hm-node-1 -o jsonpath='{.status.conditions}'"
"${kubectl[@]}" get mn hm-node-1 -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
say 'e2e/lab/lab.sh exec hm-node-1 -- wg show wg-harness'
on hm-node-1 -- wg show wg-harness
say "e2e/lab/lab.sh exec hm-node-1 -- ping -c 3 $node3      # hm-node-3 over the mesh"
on hm-node-1 -- ping -n -c 3 -i 0.2 "$node3"
say "e2e/lab/lab.sh exec hm-node-1 -- dig +short @$node1 hello.default.mesh.local      # the agent's DNS"
for _ in $(seq 1 20); do
  answer="$(on hm-node-1 -- dig +short +time=1 "@$node1" hello.default.mesh.local 2>/dev/null || true)"
  [ "$answer" = "$ip" ] && break
  sleep 0.3
done
echo "$answer"
[ "$answer" = "$ip" ] || fail "hm-node-1's agent answered '$answer' for hello.default.mesh.local, not $ip"
say "e2e/lab/lab.sh exec hm-node-1 -- dig +short @$node1 hm-node-3.node.mesh.local"
on hm-node-1 -- dig +short +time=1 "@$node1" hm-node-3.node.mesh.local
for n in 1 3; do
  say "e2e/lab/lab.sh exec hm-node-$n -- socat -u TCP:$ip:8080 -      # hello, listed port"
  reply=""
  for _ in $(seq 1 20); do
    reply="$(on "hm-node-$n" -- socat -T 2 -u "TCP:$ip:8080,connect-timeout=1" - 2>/dev/null || true)"
    [ -n "$reply" ] && break
    sleep 0.5
  done
  [ -n "$reply" ] || fail "hm-node-$n got no answer from $ip:8080 in 10 s"
  echo "$reply"
done
say "e2e/lab/lab.sh exec hm-node-1 -- socat -u TCP:$ip:8081 -      # not listed: dropped"
if on hm-node-1 -- socat -T 2 -u "TCP:$ip:8081,connect-timeout=2" - 2>&1; then
  echo 'unexpected: port 8081 answered' >&2
  exit 1
else
  echo '(no answer: nftables on hm-node-2 drops every port of the service IP but 8080)'
fi
say 'meshctl status'
"$repo/target/debug/meshctl" --kubeconfig "$repo/.lab/kubeconfig" status
echo
echo "The lab stays up: export KUBECONFIG=$repo/.lab/kubeconfig, e2e/lab/lab.sh exec hm-node-N -- CMD, then 'make lab-down'."
