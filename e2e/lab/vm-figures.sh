#!/usr/bin/env bash
# Figures of the lab's VM nodes (issue 15): VM boot to agent Ready, create -> reachable on a mixed
# mesh, and iperf3 kernel<->kernel next to userspace<->userspace. Brings the lab up with 2
# namespace nodes and 2 VM nodes (it only adds: run `make lab-down` first for a cold boot figure)
# and leaves it up. Under TCG the VMs run guest code 5-10x slower than native: throughput figures
# are relative only, and every figure moves with the load of this shared machine.
#
#   e2e/lab/ns.sh vm e2e/lab/vm-figures.sh     (in a private lab namespace, as every lab command)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
L=e2e/lab/lab.sh
kubectl() { .lab/bin/kubectl --kubeconfig .lab/kubeconfig "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }

$L up --nodes 2 --vm-nodes 1 >/dev/null 2>&1
t0="$(now)"
$L up --nodes 2 --vm-nodes 2 2>&1 | grep -E "answer commands" || true
up="$(since "$t0")"
for _ in $(seq 1 600); do
  [ "$(kubectl get mn hm-vm-2 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] && break
  sleep 0.1
done
printf 'VM boot (lab.sh up of hm-vm-2: payload image, QEMU, boot to exec): %.1f s; to MeshNode Ready: %.1f s\n' \
  "$up" "$(since "$t0")"
grep -h 'HM-VM' .lab/logs/vm-hm-vm-2.console.log | tail -n 2 | sed 's/^/  inside the VM (uptime): /'

nodes="hm-node-1 hm-node-2 hm-vm-1 hm-vm-2"
for host in hm-vm-1 hm-node-1; do
  $L exec "$host" -- timeout 120 socat TCP-LISTEN:18500,reuseaddr,fork SYSTEM:"echo hi" >/dev/null 2>&1 &
  server=$!
  sleep 1
  for try in 1 2 3 4 5; do
    name="fig-conv-$try"
    t0="$(now)"
    printf 'apiVersion: mesh.harness.dev/v1alpha1\nkind: MeshService\nmetadata: {name: %s, namespace: default}\nspec: {node: %s, network: {type: mesh, ports: [18500]}}\n' \
      "$name" "$host" | kubectl apply -f - >/dev/null
    ip=""
    for _ in $(seq 1 300); do
      ip="$(kubectl get ms "$name" -o jsonpath='{.status.meshIP}')"
      [ -z "$ip" ] || break
      sleep 0.05
    done
    for client in $nodes; do
      [ "$client" != "$host" ] || continue
      for _ in $(seq 1 300); do
        [ "$($L exec "$client" -- socat -T 1 -u "TCP:$ip:18500,connect-timeout=1" - 2>/dev/null)" != hi ] || break
        sleep 0.05
      done
    done
    printf 'MeshService on %s: create -> reachable from the 3 other nodes (shell polling, an upper bound): %.2f s\n' \
      "$host" "$(since "$t0")"
    kubectl delete ms "$name" --wait=true >/dev/null
  done
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
done

# Over the mesh to a service the server hosts (iperf3's port listed): a node's own mesh IP opens
# only the agent's ports to peers (a node is a member, not a router).
iperf() { # client server
  local ip="" name="fig-iperf-$2"
  printf 'apiVersion: mesh.harness.dev/v1alpha1\nkind: MeshService\nmetadata: {name: %s, namespace: default}\nspec: {node: %s, network: {type: mesh, ports: [5201]}}\n' \
    "$name" "$2" | kubectl apply -f - >/dev/null
  for _ in $(seq 1 300); do
    ip="$(kubectl get ms "$name" -o jsonpath='{.status.meshIP}')"
    [ -z "$ip" ] || break
    sleep 0.05
  done
  $L exec "$2" -- timeout 20 iperf3 -s -1 >/dev/null 2>&1 &
  sleep 2
  $L exec "$1" -- timeout 20 iperf3 -c "$ip" -t 5 -f m 2>&1 | awk '/receiver/ { print $7, $8 }'
  wait
  kubectl delete ms "$name" --wait=true >/dev/null
}
echo "iperf3 -t 5 over the mesh (TCG: relative figures only):"
echo "  kernel    -> kernel    (hm-vm-1 -> hm-vm-2):     $(iperf hm-vm-1 hm-vm-2)"
echo "  userspace -> userspace (hm-node-1 -> hm-node-2): $(iperf hm-node-1 hm-node-2)"
echo "  userspace -> kernel    (hm-node-1 -> hm-vm-1):   $(iperf hm-node-1 hm-vm-1)"
echo "  kernel    -> userspace (hm-vm-1 -> hm-node-1):   $(iperf hm-vm-1 hm-node-1)"
$L exec hm-vm-2 -- timeout 20 iperf3 -s -1 -B 192.168.77.222 >/dev/null 2>&1 &
sleep 2
echo "  VM underlay, no tunnel (hm-vm-1 -> hm-vm-2):     $($L exec hm-vm-1 -- timeout 20 iperf3 -c 192.168.77.222 -t 5 -f m 2>&1 | awk '/receiver/ { print $7, $8 }')"
wait
