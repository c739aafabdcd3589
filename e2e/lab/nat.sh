# shellcheck shell=bash disable=SC2154 # lab.sh, which sources this file, sets the lab's variables
# NAT nodes (lab.sh up --nat-nodes K): nodes hm-nat-1..K, each behind a NAT router of its own,
# hm-natr-1..K. Sourced by lab.sh (it uses lab.sh's helpers and variables). See "NAT nodes" in
# e2e/lab/README.md.
#
#  hm-lab: hm-br ── hm-r<K> ══ wan0 192.168.77.(230+K)/24   hm-natr-K   lan0 10.77.K.1/30 ══ eth0 10.77.K.2/30   hm-nat-K
#                              (nftables masquerade on wan0; forward: new only from lan0)       (default route via 10.77.K.1)
#
# The router is a network namespace and nothing else (its rules, routes and sysctl live with
# it; no process runs there). The node is a node like hm-node-i: holder, apiserver relay (the
# unix socket crosses namespaces, so the agent reaches the apiserver on its own 127.0.0.1 behind
# the NAT), mesh-agent, and a MeshNode with spec.persistentKeepalive: 25.

# shellcheck disable=SC2034 # read by lab.sh
nat_max=9 # the most NAT nodes (--nat-nodes 0-9)
# Router K has $node_net.$((nat_net_offset + K)) on the lab bridge (VMs take 221..229).
nat_net_offset=230
# The keepalive a NATed node's MeshNode asks for (the usual 25 s, below Linux's 30 s UDP timeout).
nat_keepalive=25

nat_router_addr() { echo "$node_net.$((nat_net_offset + $1))"; }
# The private /30 between router K and its node: .1 the router (lan0), .2 the node (eth0).
nat_private_net() { echo "10.77.$1"; }

is_nat_name() { [[ "$1" =~ ^hm-nat-[1-9]$ ]]; }
is_nat_router_name() { [[ "$1" =~ ^hm-natr-[1-9]$ ]]; }

# The lab's NAT nodes, hm-nat-1..K in order.
lab_nats() { lab_netns | awk '/^hm-nat-[1-9]$/' | sort -t- -k3 -n; }

# The number of the highest NAT node that exists (0 if none).
nats_present() {
  local node m=0
  for node in $(lab_nats); do
    if [ "${node#hm-nat-}" -gt "$m" ]; then m="${node#hm-nat-}"; fi
  done
  echo "$m"
}

# The router's rules: masquerade what leaves through wan0; forward only what a private side
# (lan0, or lanK of a node moved here by nat-move) starts, and its replies; nothing between two
# private sides; nothing to the router itself from outside but replies.
nat_ruleset() {
  cat <<'EOF'
table ip hm_nat
delete table ip hm_nat
table ip hm_nat {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan*" oifname "wan0" ct state new accept
  }
  chain input {
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    iifname "lan*" accept
    ct state established,related accept
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }
}
EOF
}

# Gives NAT node K its router and node namespaces, links, addresses, route and rules, unless
# they have them all already. $2 lists the bridge ports that are up.
ensure_nat_net() {
  local k="$1" ports="$2" node="hm-nat-$1" router="hm-natr-$1" wan lan
  wan="$(nat_router_addr "$k")/24"
  lan="$(nat_private_net "$k")"
  if netns_exists "$router" && netns_exists "$node" && [[ " $ports " == *" hm-r$k "* ]] &&
    [[ "$(ip -n "$router" -o -4 addr show dev wan0 up 2>/dev/null)" == *" inet $wan "* ]] &&
    [[ "$(ip -n "$node" -o -4 addr show dev eth0 up 2>/dev/null)" == *" inet $lan.2/30 "* ]] &&
    ip netns exec "$router" nft list table ip hm_nat >/dev/null 2>&1; then
    return 0
  fi
  log "creating NAT node $node behind router $router (wan0 $wan on $bridge, lan0 $lan.1/30, node eth0 $lan.2/30)"
  netns_exists "$router" || ip netns add "$router"
  netns_exists "$node" || ip netns add "$node"
  ip -n "$router" link set lo up
  ip -n "$node" link set lo up
  if ! ip -n "$router" link show wan0 >/dev/null 2>&1; then
    ip -n "$bridge_ns" link delete "hm-r$k" >/dev/null 2>&1 || true
    ip -n "$bridge_ns" link add "hm-r$k" type veth peer name wan0 netns "$router"
  fi
  ip -n "$bridge_ns" link set "hm-r$k" master "$bridge" up
  ip -n "$router" addr replace "$wan" dev wan0
  ip -n "$router" link set wan0 up
  if ! ip -n "$node" link show eth0 >/dev/null 2>&1; then
    ip -n "$router" link delete lan0 >/dev/null 2>&1 || true
    ip -n "$router" link add lan0 type veth peer name eth0 netns "$node"
  fi
  ip -n "$router" addr replace "$lan.1/30" dev lan0
  ip -n "$router" link set lan0 up
  ip -n "$node" addr replace "$lan.2/30" dev eth0
  ip -n "$node" link set eth0 up
  ip -n "$node" route replace default via "$lan.1" dev eth0
  ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1
  nat_ruleset | ip netns exec "$router" nft -f -
}

# NAT nodes 1..$1 with their routers, holders and relays (only what is missing), and a MeshNode
# for each.
start_nat_nodes() {
  local nats="$1" k node ports
  new_relays=()
  [ "$nats" -gt 0 ] || return 0
  command -v nft >/dev/null || die "nft is missing: run e2e/lab/install-deps.sh"
  start_relay
  ensure_run_wireguard
  ensure_bridge
  ports="$(ip -n "$bridge_ns" -o link show master "$bridge" up |
    awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | tr '\n' ' ')"
  for ((k = 1; k <= nats; k++)); do
    node="hm-nat-$k"
    ensure_nat_net "$k" "$ports"
    start_node_runtime "$node"
  done
  wait_new_relays
  apply_nat_meshnodes "$nats"
  [ "$nats" -lt 2 ] || designate_mesh_relay
}

# The open node that relays between NAT nodes, which cannot reach each other directly: the
# first namespace node. spec.relay is applied with a field manager of its own, so it survives
# the lab's own applies of the node's MeshNode.
nat_relay_node="hm-node-1"
designate_mesh_relay() {
  netns_exists "$nat_relay_node" || { log "no $nat_relay_node: the NAT nodes have no mesh relay"; return 0; }
  printf -- 'apiVersion: mesh.harness.dev/v1alpha1\nkind: MeshNode\nmetadata:\n  name: %s\nspec:\n  relay: true\n' \
    "$nat_relay_node" | lab_kubectl apply --server-side --field-manager=harness-mesh-lab-relay -f - >/dev/null
  log "$nat_relay_node relays between the NAT nodes (spec.relay: true)"
}

# nat-move K J: moves NAT node K behind router J, as a machine that moves to another network
# would: its link to its router is deleted and a new one made to router J (lanK there,
# 10.77.(100+10J+K).0/30, the node .2 with its default route via .1). J = K moves it back home
# (10.77.K.0/30 on lan0). Its agent, its key and its MeshNode stay; its underlay address changes.
cmd_nat_move() {
  [ $# -eq 2 ] || die "usage: lab.sh nat-move K J (NAT node K behind router J; J=K: home)"
  local k="$1" j="$2" node router lan net
  [[ "$k" =~ ^[1-9]$ && "$j" =~ ^[1-9]$ ]] || die "nat-move: K and J are NAT node numbers 1-9"
  node="hm-nat-$k" router="hm-natr-$j"
  if ! netns_exists "$node" || ! netns_exists "$router"; then
    die "nat-move: no $node or no $router (lab.sh up --nat-nodes)"
  fi
  if [ "$j" = "$k" ]; then lan=lan0 net="$(nat_private_net "$k")"; else lan="lan$k" net="10.77.$((100 + 10 * j + k))"; fi
  # Deleting the node's end deletes the router's end, wherever it is.
  ip -n "$node" link delete eth0 >/dev/null 2>&1 || true
  ip -n "$router" link delete "$lan" >/dev/null 2>&1 || true
  ip -n "$router" link add "$lan" type veth peer name eth0 netns "$node"
  ip -n "$router" addr replace "$net.1/30" dev "$lan"
  ip -n "$router" link set "$lan" up
  ip -n "$node" addr replace "$net.2/30" dev eth0
  ip -n "$node" link set eth0 up
  ip -n "$node" route replace default via "$net.1" dev eth0
  log "$node is behind $router now: eth0 $net.2/30, $router $lan $net.1/30, outside $(nat_router_addr "$j")"
}

# One MeshNode hm-nat-K per NAT node, with spec.persistentKeepalive (server-side apply, field
# manager harness-mesh-lab: it owns that field alone).
apply_nat_meshnodes() {
  local nats="$1" k
  for ((k = 1; k <= nats; k++)); do
    printf -- '---\napiVersion: mesh.harness.dev/v1alpha1\nkind: MeshNode\nmetadata:\n  name: hm-nat-%s\nspec:\n  persistentKeepalive: %s\n' \
      "$k" "$nat_keepalive"
  done | lab_kubectl apply --server-side --field-manager=harness-mesh-lab -f - >/dev/null
}

# A mesh-agent on each of the NAT nodes 1..$1 that has none running, if the agent is built.
start_nat_agents() {
  local nats="$1" k
  [ "$nats" -gt 0 ] || return 0
  link_agent || return 0 # start_agents said so already
  for ((k = 1; k <= nats; k++)); do
    agent_pid "hm-nat-$k" >/dev/null || start_agent "hm-nat-$k"
  done
}

# status: one line per NAT node (its router, holder, relay and agent); returns 3 if any part is
# missing.
nat_status() {
  local node k router pid holder relay agent up=0
  for node in $(lab_nats); do
    k="${node#hm-nat-}"
    router="hm-natr-$k"
    holder=stopped relay=stopped agent=stopped
    if pid="$(holder_pid "$node")"; then holder="pid $pid"; else up=3; fi
    if pid="$(node_relay_pid "$node")"; then relay="pid $pid"; else up=3; fi
    if pid="$(agent_pid "$node")"; then agent="pid $pid"; fi
    if ! netns_exists "$router" || ! ip netns exec "$router" nft list table ip hm_nat >/dev/null 2>&1; then
      router="$router (missing)"
      up=3
    fi
    printf '%-16s %-15s behind %s at %s, holder %s, relay %s, agent %s\n' "$node:" \
      "$(nat_private_net "$k").2" "$router" "$(nat_router_addr "$k")" "$holder" "$relay" "$agent"
  done
  return $up
}
