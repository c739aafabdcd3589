#!/usr/bin/env bash
# The harness-mesh lab: a local Kubernetes control plane (real etcd + kube-apiserver, built from
# pinned sources by e2e/lab/build-binaries.sh) that the tests and the demo run against, on a
# machine without Docker, kind or kernel WireGuard, plus node network namespaces hm-node-1..N
# joined by a bridge, each running a mesh-agent. See e2e/lab/README.md, and the design's
# sections "The lab" and "Lab contract".
#
#   e2e/lab/lab.sh up [--nodes N] [--mode plain|kubelet]   start the lab (idempotent)
#   e2e/lab/lab.sh down                                    stop it all, delete .lab/ (idempotent)
#   e2e/lab/lab.sh status                                  exit 0 if up, 3 if not
#   e2e/lab/lab.sh exec NODE -- CMD...                     run CMD on a node
#   e2e/lab/lab.sh agent start|stop|restart|kill NODE      control a node's mesh-agent
#   e2e/lab/lab.sh controller start|stop|restart|kill      control the lab's mesh-controller
#   e2e/lab/lab.sh apiserver stop|start                    stop/start kube-apiserver (etcd stays)
#   e2e/lab/lab.sh ssh-node K                             node K runs sshd instead of an agent
#   e2e/lab/lab.sh podman start|stop NODE                  a container engine (Podman) on a node
#   e2e/lab/lab.sh podman NODE -- ARGS...                  the podman CLI against that engine
#
# All state lives in <repo>/.lab/ (bin/, pki/, etcd/, logs/, pids/, run/, nodes/, config,
# kubeconfig).
# Network rule (hard): everything listens on and talks to 127.0.0.1 only, or to addresses inside
# network namespaces the lab made itself (hm-lab, hm-node-N). Nothing else, ever.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lab="$repo/.lab"
bin_dir="$lab/bin"
pki="$lab/pki"
log_dir="$lab/logs"
pid_dir="$lab/pids"
kubeconfig="$lab/kubeconfig"
# The chart's RBAC (no workloads) is installed as this release; the controller and the agents
# run with tokens of its ServiceAccounts, not as admin.
chart_release=harness-mesh
chart_namespace=harness-mesh
controller_sa=harness-mesh-controller # the chart names its objects <release>-..., or just the
agent_sa=harness-mesh-agent           # release name when that contains "harness-mesh"
controller_kubeconfig="$lab/controller.kubeconfig"
config="$lab/config"

api_port="${LAB_API_PORT:-16443}"
etcd_port="${LAB_ETCD_PORT:-23790}"
controller_metrics_port="${LAB_CONTROLLER_METRICS_PORT:-18080}"
etcd_peer_port="${LAB_ETCD_PEER_PORT:-23800}"
wait_seconds="${LAB_WAIT_SECONDS:-90}"
stop_seconds="${LAB_STOP_SECONDS:-30}"

# Components in start order; `down` stops them in reverse. Kubelet mode adds
# kube-controller-manager and kube-scheduler.
components=(etcd kube-apiserver)
# kube-apiserver flags that depend on the mode (configure_mode sets them).
apiserver_extra_args=(--authorization-mode=RBAC)
# Prefix of every network namespace the lab owns (`down` deletes all of them).
netns_prefix="hm-"
# Node namespaces are hm-node-1..N; the bridge that joins them lives in this namespace.
bridge_ns="hm-lab"
bridge="hm-br"
max_nodes=250
# Node i has 192.168.77.i/24 on its eth0, whose peer hm-v<i> is a port of $bridge in $bridge_ns.
node_net="192.168.77"
# The apiserver relay: a unix socket in the root namespace (files cross network namespaces), fed
# by a socat on 127.0.0.1:$api_port inside every node.
run_dir="$lab/run"
api_sock="$run_dir/apiserver.sock"
# Per-node state that survives agent restarts (the agent's private key): $nodes_dir/hm-node-i.
nodes_dir="$lab/nodes"
# SSH nodes (lab.sh ssh-node K): keys, known_hosts, and each node's sshd config and overlays.
ssh_dir="$lab/ssh"
# The unprivileged user every SSH node has besides root (same key; neither root nor sudo).
ssh_user=hm-user
agent_stop_seconds="${LAB_AGENT_STOP_SECONDS:-5}"
apiserver_stop_seconds="${LAB_APISERVER_STOP_SECONDS:-5}"

log() { printf '[lab] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat <<EOF
Usage: e2e/lab/lab.sh COMMAND [OPTIONS]

The harness-mesh lab: local etcd + kube-apiserver (RBAC on) on 127.0.0.1, state in .lab/, and
node network namespaces hm-node-1..N, each with a mesh-agent (when target/debug/mesh-agent is
built) and userspace WireGuard.

Commands:
  up [--nodes N] [--mode plain|kubelet]
                 Start the lab; a no-op for what is already running. Writes .lab/kubeconfig.
                 --nodes N   node namespaces hm-node-1..N (default: \$LAB_NODES or 0); only adds
                             what is missing, never removes a node (down does)
                 --mode M    plain (default: \$LAB_MODE, else the running lab's mode, else
                             plain): the lab runs mesh-controller
                             and an agent per node itself; kubelet: kube-controller-manager,
                             kube-scheduler, containerd and a kubelet per node, and the whole
                             chart (images built locally) runs as pods (e2e/lab/kubelet.sh)
                 --without-tun K   node K (new) has no /dev/net/tun: its agent falls back to
                             no WireGuard (repeatable)
                 --vm-nodes K  VM nodes hm-vm-1..K (0-9, default \$LAB_VM_NODES or 0): QEMU
                             VMs with Debian's cloud kernel, on the lab bridge at
                             192.168.77.(220+K), each running mesh-agent --wireguard=kernel
                             (plain mode only; e2e/lab/vm.sh, e2e/lab/README.md)
                 --nat-nodes K  NAT nodes hm-nat-1..K (0-9, default \$LAB_NAT_NODES or 0), each
                             behind a NAT router hm-natr-K of its own (nftables masquerade;
                             192.168.77.(230+K) on the bridge, 10.77.K.0/30 to its node), with
                             an agent and a MeshNode with persistentKeepalive: 25 (plain mode
                             only; e2e/lab/nat.sh, e2e/lab/README.md)
  down           Stop every lab process, delete every hm-* network namespace and .lab/.
  status         Show each component, the apiserver version and the nodes; exit 0 if up, 3 if not.
  exec NODE [--] CMD [ARG...]
                 Run CMD on NODE (hm-node-N, or just N): in its network namespace and its private
                 mount namespace (own /run/wireguard, the node's /sys). Exit status is CMD's.
                 On a VM node (hm-vm-K) CMD runs in the VM, through lab-vm-exec; NODE may
                 be a NAT node (hm-nat-K), or its router (hm-natr-K: ip netns exec).
  agent start|stop|restart|kill NODE
                 Start NODE's mesh-agent (the lab must be up), stop it (SIGTERM, SIGKILL after
                 \$LAB_AGENT_STOP_SECONDS), restart it, or SIGKILL it at once (fault tests).
                 A (re)start runs \$HM_AGENT_BIN when set (the scale bench runs a release build),
                 else target/debug/mesh-agent.
                 In kubelet mode only restart: the node's agent pod is deleted and replaced.
  controller start|stop|restart|kill
                 The same for the lab's mesh-controller (its log: .lab/logs/mesh-controller.log).
  apiserver stop|start
                 Stop kube-apiserver (SIGTERM; etcd, the controller, the agents and the tunnels
                 keep running) or start it again and wait until it is ready (fault tests).
  ssh-node K     Make hm-node-K a remote machine to enroll (meshctl enroll): Debian's sshd on
                 192.168.77.K:22 instead of an agent, no MeshNode, a private /run and
                 copy-on-write /etc, /usr/local and /var (changes stay in .lab/ssh/hm-node-K/).
                 Logins: root and $ssh_user with the key .lab/ssh/client_ed25519; the host keys
                 are in .lab/ssh/known_hosts. Idempotent; \`up\` leaves SSH nodes alone.
  podman start|stop NODE
                 A container engine on NODE: Debian's Podman with its Docker-compatible API on
                 .lab/nodes/NODE/podman/podman.sock (start returns once GET /_ping answers),
                 containers on the bridge podman0 (10.88.N.0/24) in the node's namespace, and
                 the image $podman_image. stop stops every container, the service and the
                 engine's mount namespace; images and containers stay until \`down\`.
                 Idempotent; see "Container engine on a node" in e2e/lab/README.md.
  podman NODE [--] ARGS...
                 Run \`podman ARGS...\` against NODE's engine (same storage, same state).
  nat-move K J   Move NAT node hm-nat-K behind router hm-natr-J, as a machine that moves to
                 another network (its underlay address changes; J=K moves it back home). With
                 2 or more NAT nodes, \`up\` makes hm-node-1 the mesh relay (spec.relay: true).
  help, --help   This text.

Nodes: hm-node-i has eth0 = 192.168.77.i/24, the peer of hm-v<i>, a port of the bridge hm-br in
the namespace hm-lab. Inside a node, https://127.0.0.1:\$LAB_API_PORT reaches the apiserver
through a relay (socat to the unix socket .lab/run/apiserver.sock), so .lab/kubeconfig works
there unchanged. Agent state (its private key) is in .lab/nodes/hm-node-i/, its log in
.lab/logs/mesh-agent-hm-node-i.log, its pid in .lab/pids/mesh-agent-hm-node-i.pid.

Environment:
  LAB_API_PORT        kube-apiserver secure port   (default 16443)
  LAB_ETCD_PORT       etcd client port             (default 23790)
  LAB_ETCD_PEER_PORT  etcd peer port               (default 23800)
  LAB_CONTROLLER_METRICS_PORT  mesh-controller metrics (default 18080)
  LAB_WAIT_SECONDS    readiness timeout of \`up\`    (default 90)
  LAB_STOP_SECONDS    SIGTERM grace of \`down\`      (default 30)
  LAB_AGENT_STOP_SECONDS  SIGTERM grace of \`agent stop\` (default 5)
  LAB_APISERVER_STOP_SECONDS  SIGTERM grace of \`apiserver stop\` (default 5)
  RUST_LOG            log filter of the controller and the agents (default info)

Everything listens on and talks to 127.0.0.1 only, or to addresses inside the lab's namespaces.
EOF
}

# --- processes ------------------------------------------------------------------------------

# True if $1 is a live (not zombie) process. Stopped daemons are reaped by PID 1, lazily, so a
# dead one can linger as a zombie for a while.
alive() {
  local pid="$1" stat
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

# argv[0] of process $1 (empty if gone).
argv0() { tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | head -n 1 || true; }

# Prints the pid in .lab/pids/$1.pid if it names a live process whose argv[0] is $2, or, for
# $2 = comm:NAME, whose command name is NAME (for a daemon that rewrites its argv, as sshd does).
pid_of() {
  local name="$1" want="$2" pid
  [ -f "$pid_dir/$name.pid" ] || return 1
  pid="$(cat "$pid_dir/$name.pid" 2>/dev/null)" || return 1
  alive "$pid" || return 1
  case "$want" in
    comm:*) [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${want#comm:}" ] || return 1 ;;
    *) [ "$(argv0 "$pid")" = "$want" ] || return 1 ;;
  esac
  echo "$pid"
}

# Prints the pid of lab component $1 if its pid file names a live process of that binary.
component_pid() { pid_of "$1" "$bin_dir/$1"; }

# spawn NAME ARGV0 CMD [ARG...]: starts CMD as a session-leader daemon named NAME; output goes to
# .lab/logs/NAME.log (appended), the pid to .lab/pids/NAME.pid, and it waits until that pid has
# become the process whose argv[0] is ARGV0. The wrapper shell writes its own pid and then execs,
# so the pid is right even if setsid has to fork; every wrapper in CMD must exec, not fork (env,
# nsenter, `ip netns exec` and `unshare` without --fork do). Proxy variables are unset, and fd 9
# (the lab lock) is not inherited.
spawn() {
  local name="$1" want="$2"; shift 2
  mkdir -p "$log_dir" "$pid_dir"
  rm -f "$pid_dir/$name.pid"
  # shellcheck disable=SC2016 # $$ and $1 are for the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec nohup "$@"' lab-daemon "$pid_dir/$name.pid" \
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy \
    "$@" \
    </dev/null >>"$log_dir/$name.log" 2>&1 9>&- &
  local _ pid
  for _ in $(seq 1 250); do
    pid_of "$name" "$want" >/dev/null && return 0
    pid="$(cat "$pid_dir/$name.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && ! alive "$pid"; then break; fi # it has exited already
    sleep 0.02
  done
  log "$name did not start; last lines of $log_dir/$name.log:"
  tail -n 40 "$log_dir/$name.log" >&2 || true
  exit 1
}

# Starts "$bin_dir/$1" with the remaining arguments as a lab daemon (see spawn).
daemon() {
  local name="$1"; shift
  spawn "$name" "$bin_dir/$name" "$bin_dir/$name" "$@"
}

# Waits (at most 5 s, quietly) until the given dead pids have been reaped. The daemons are
# re-parented to PID 1, which reaps them a moment later; until then `pgrep` still lists them.
await_reaped() {
  local pid _ left
  for _ in $(seq 1 50); do
    left=0
    for pid in "$@"; do
      if [ -e "/proc/$pid" ]; then left=1; fi
    done
    [ $left = 1 ] || return 0
    sleep 0.1
  done
}

# SIGTERM the given pids, wait up to $stop_seconds, then SIGKILL what is left. The pids are
# added to stopped_pids, for one await_reaped at the end.
stopped_pids=()
stop_pids() {
  local label="$1"; shift
  local pid live=() deadline
  for pid in "$@"; do
    if alive "$pid"; then live+=("$pid"); fi
  done
  [ ${#live[@]} -gt 0 ] || return 0
  log "stopping $label (pid ${live[*]})"
  kill -TERM "${live[@]}" 2>/dev/null || true
  deadline=$((SECONDS + stop_seconds))
  while [ $SECONDS -lt $deadline ]; do
    local left=()
    for pid in "${live[@]}"; do
      if alive "$pid"; then left+=("$pid"); fi
    done
    if [ ${#left[@]} -eq 0 ]; then
      stopped_pids+=("${live[@]}")
      return 0
    fi
    sleep 0.2
  done
  log "$label did not stop within ${stop_seconds}s; sending SIGKILL"
  kill -KILL "${live[@]}" 2>/dev/null || true
  local any _
  for _ in $(seq 1 50); do
    any=0
    for pid in "${live[@]}"; do
      if alive "$pid"; then any=1; fi
    done
    if [ $any = 0 ]; then
      stopped_pids+=("${live[@]}")
      return 0
    fi
    sleep 0.1
  done
  log "warning: $label still alive after SIGKILL"
}

# Fails if something that is not ours already listens on 127.0.0.1:$2 (or any address:$2).
port_free() {
  local name="$1" port="$2"
  command -v ss >/dev/null || return 0
  if [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; then
    die "port $port (for $name) is already in use by another process; set LAB_*_PORT or free it"
  fi
}

# Checks the ports of every component that is not running yet, before anything is started.
preflight_ports() {
  if ! component_pid etcd >/dev/null; then
    port_free etcd "$etcd_port"
    port_free etcd-peer "$etcd_peer_port"
  fi
  if ! component_pid kube-apiserver >/dev/null; then port_free kube-apiserver "$api_port"; fi
}

# Waits (bounded) until "$2..." succeeds, failing early if component $1 has died.
wait_for() {
  local name="$1"; shift
  local deadline=$((SECONDS + wait_seconds))
  while [ $SECONDS -lt $deadline ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! component_pid "$name" >/dev/null; then
      log "$name exited; last lines of $log_dir/$name.log:"
      tail -n 40 "$log_dir/$name.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  log "$name not ready after ${wait_seconds}s; last lines of $log_dir/$name.log:"
  tail -n 40 "$log_dir/$name.log" >&2 || true
  exit 1
}

# curl against the lab apiserver as admin. Never through a proxy.
api_curl() {
  curl -fsS --noproxy '*' --max-time 5 --cacert "$pki/ca.crt" \
    --cert "$pki/admin.crt" --key "$pki/admin.key" "https://127.0.0.1:$api_port$1"
}

lab_kubectl() {
  env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
    "$bin_dir/kubectl" --kubeconfig "$kubeconfig" --request-timeout=5s "$@"
}

# --- up -------------------------------------------------------------------------------------

ensure_binaries() {
  local names=(etcd kube-apiserver kubectl helm) paths=() i
  mapfile -t paths < <("$here/build-binaries.sh" "${names[@]}")
  [ ${#paths[@]} -eq ${#names[@]} ] ||
    die "build-binaries.sh printed ${#paths[@]} paths, expected ${#names[@]}"
  mkdir -p "$bin_dir"
  for i in "${!names[@]}"; do
    [ -x "${paths[$i]}" ] ||
      die "build-binaries.sh gave no executable for ${names[$i]}: ${paths[$i]}"
    ln -sfn "${paths[$i]}" "$bin_dir/${names[$i]}"
  done
}

# One CA, the apiserver serving cert, the admin client cert and the service-account key pair.
# Made once per lab (`down` deletes them); built in a temp dir and moved into place.
ensure_pki() {
  [ -f "$pki/ca.crt" ] && [ -f "$pki/admin.key" ] && [ -f "$pki/sa.pub" ] && return 0
  log "generating PKI in $pki"
  local tmp="$lab/pki.tmp"
  rm -rf "$tmp" "$pki"
  mkdir -p "$tmp"
  (
    umask 077
    cd "$tmp"
    # $node_net.254 (the bridge in hm-lab) is where kubelet mode advertises the apiserver: the
    # `kubernetes` Service's endpoint.
    cat >openssl.cnf <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[apiserver]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, IP:$node_net.254, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EOF
    local q=(-quiet) # openssl 3 genpkey prints progress dots without it
    openssl genpkey "${q[@]}" -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
    openssl req -x509 -new -config openssl.cnf -extensions ca -key ca.key -sha256 -days 3650 \
      -subj "/CN=harness-mesh-lab-ca" -out ca.crt
    sign() { # $1 = file stem, $2 = subject, $3 = extension section
      openssl genpkey "${q[@]}" -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1.key"
      openssl req -new -config openssl.cnf -key "$1.key" -subj "$2" -out "$1.csr"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key \
        -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
        -extfile openssl.cnf -extensions "$3" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr"
    }
    sign apiserver "/CN=kube-apiserver" apiserver
    sign admin "/O=system:masters/CN=harness-mesh-admin" client
    openssl genpkey "${q[@]}" -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
    openssl pkey -in sa.key -pubout -out sa.pub
    rm -f openssl.cnf
  )
  chmod 700 "$tmp"
  mv "$tmp" "$pki"
}

start_etcd() {
  local pid
  if pid="$(component_pid etcd)"; then
    log "etcd already running (pid $pid)"
  else
    port_free etcd "$etcd_port"
    port_free etcd-peer "$etcd_peer_port"
    log "starting etcd on 127.0.0.1:$etcd_port"
    mkdir -p "$lab/etcd"
    chmod 700 "$lab/etcd"
    daemon etcd \
      --name=lab \
      --data-dir="$lab/etcd" \
      --listen-client-urls="http://127.0.0.1:$etcd_port" \
      --advertise-client-urls="http://127.0.0.1:$etcd_port" \
      --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
      --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
      --initial-cluster="lab=http://127.0.0.1:$etcd_peer_port" \
      --initial-cluster-state=new
  fi
  wait_for etcd etcd_healthy
}

etcd_healthy() {
  local out
  out="$(curl -fsS --noproxy '*' --max-time 3 "http://127.0.0.1:$etcd_port/health")" || return 1
  [[ "$out" == *'"health":"true"'* ]]
}

# --endpoint-reconciler-type=none: the apiserver refuses a loopback advertise address with the
# lease/master-count reconcilers (Endpoints may not hold 127.0.0.0/8), and the network rule
# forbids advertising anything else. So the `kubernetes` Service has no endpoints in the plain
# lab. Kubelet mode overrides both (kubelet_apiserver_args): there the endpoint is a relay on the
# lab bridge, inside the lab's own namespaces.
start_apiserver() {
  local pid
  if [ "$lab_run_mode" = kubelet ]; then mapfile -t apiserver_extra_args < <(kubelet_apiserver_args); fi
  if pid="$(component_pid kube-apiserver)"; then
    log "kube-apiserver already running (pid $pid)"
  else
    port_free kube-apiserver "$api_port"
    log "starting kube-apiserver on 127.0.0.1:$api_port"
    daemon kube-apiserver \
      --bind-address=127.0.0.1 \
      --advertise-address=127.0.0.1 \
      --endpoint-reconciler-type=none \
      --secure-port="$api_port" \
      --etcd-servers="http://127.0.0.1:$etcd_port" \
      --tls-cert-file="$pki/apiserver.crt" \
      --tls-private-key-file="$pki/apiserver.key" \
      --client-ca-file="$pki/ca.crt" \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-account-key-file="$pki/sa.pub" \
      --service-account-signing-key-file="$pki/sa.key" \
      --api-audiences=https://kubernetes.default.svc.cluster.local \
      --service-cluster-ip-range=10.96.0.0/16 \
      --allow-privileged=true \
      "${apiserver_extra_args[@]}"
  fi
  wait_for kube-apiserver api_curl /readyz
}

write_kubeconfig() {
  local tmp="$kubeconfig.tmp"
  (
    umask 077
    cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: harness-mesh-lab
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: harness-mesh-admin
  user:
    client-certificate-data: $(base64 -w0 <"$pki/admin.crt")
    client-key-data: $(base64 -w0 <"$pki/admin.key")
contexts:
- name: harness-mesh-lab
  context:
    cluster: harness-mesh-lab
    user: harness-mesh-admin
current-context: harness-mesh-lab
EOF
  )
  mv "$tmp" "$kubeconfig"
}

# Installs the CRDs from crds/ (before the MeshNodes, the agents and the controller need them).
install_crds() {
  lab_kubectl apply --server-side --force-conflicts --field-manager=harness-mesh-lab -f "$repo/crds/" >/dev/null
  lab_kubectl wait --for=condition=Established --timeout=60s \
    crd/meshnodes.mesh.harness.dev crd/meshservices.mesh.harness.dev >/dev/null
}

# The chart's ServiceAccounts, RBAC and node restriction, without its workloads (the lab runs
# mesh-controller and the agents itself, with tokens of those ServiceAccounts), so every lab run
# proves that the chart grants enough and the node restriction lets each agent do its job.
# Upgraded only when charts/harness-mesh changed since the last install.
install_chart() {
  local sum
  sum="$(cd "$repo" && find charts/harness-mesh -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)"
  if [ -f "$lab/chart.sum" ] && [ "$(cat "$lab/chart.sum")" = "$sum" ]; then return 0; fi
  log "installing the chart's RBAC (release $chart_release in namespace $chart_namespace)"
  env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY "$bin_dir/helm" upgrade --install \
    "$chart_release" "$repo/charts/harness-mesh" --kubeconfig "$kubeconfig" \
    --namespace "$chart_namespace" --create-namespace --history-max 2 \
    --set controller.deploy=false --set agent.deploy=false >/dev/null
  echo "$sum" >"$lab/chart.sum"
}

# Writes kubeconfig $1 (mode 0600) that authenticates with bearer token $2 alone.
write_token_kubeconfig() {
  local file="$1" token="$2" tmp="$1.tmp"
  rm -f "$tmp"
  (
    umask 077
    export KUBECONFIG="$tmp"
    "$bin_dir/kubectl" config set-cluster lab --server="https://127.0.0.1:$api_port" \
      --certificate-authority="$pki/ca.crt" --embed-certs=true >/dev/null
    "$bin_dir/kubectl" config set-credentials token --token="$token" >/dev/null
    "$bin_dir/kubectl" config set-context lab --cluster=lab --user=token >/dev/null
    "$bin_dir/kubectl" config use-context lab >/dev/null
  )
  mv "$tmp" "$file"
}

# The lab's placement and short-name policy (mesh-controller and mesh-agent flags; the chart's
# mesh.placementNamespaces and mesh.shortNameNamespaces): the suites place services on the lab's
# nodes from namespaces of their own, so every namespace may; short names only for `default` and
# the discovery suite's namespaces (e2e/tests/discovery.rs), so that the attack suite can show
# that any other namespace gets none.
lab_placement_namespaces='*'
lab_short_name_namespaces='default,e2e-discovery,e2e-discovery-2'
# How the plain and NAT nodes' agents give the node's own processes the zone's names (mesh-agent
# --resolver): hosts, each node with an /etc/hosts of its own (node_hosts_file). HM_LAB_RESOLVER=off
# runs them as before issue 23 (to see the resolver suite fail without it).
lab_resolver="${HM_LAB_RESOLVER:-hosts}"

# Runs mesh-controller (leader election on, as in a cluster) when the workspace has built it (`make lab-up` does: cargo build -p mesh-controller). Metrics on
# 127.0.0.1:$LAB_CONTROLLER_METRICS_PORT. Its election identity is fixed, as a pod's name is in a
# cluster: a controller restarted after a crash (`lab.sh controller kill`, then `start`) takes
# its own lease back at once, as a restarted container of the same pod does.
start_controller() {
  local built="$repo/target/debug/mesh-controller"
  if [ ! -x "$built" ]; then
    log "note: $built is not built, so the lab runs no controller (make lab-up builds it)"
    return 0
  fi
  ln -sf "$built" "$bin_dir/mesh-controller"
  if component_pid mesh-controller >/dev/null; then return 0; fi
  log "starting mesh-controller (metrics on 127.0.0.1:$controller_metrics_port)"
  local token
  token="$(lab_kubectl -n "$chart_namespace" create token "$controller_sa" --duration=8760h)"
  write_token_kubeconfig "$controller_kubeconfig" "$token"
  KUBECONFIG="$controller_kubeconfig" RUST_LOG="${RUST_LOG:-info}" daemon mesh-controller \
    --metrics-addr="127.0.0.1:$controller_metrics_port" --lease-namespace="$chart_namespace" \
    --identity=lab-mesh-controller --placement-namespaces="$lab_placement_namespaces" \
    --short-name-namespaces="$lab_short_name_namespaces" --zone="$(lab_zone)"
}

# --- nodes ----------------------------------------------------------------------------------
#
# Node hm-node-i is a network namespace with eth0 = 192.168.77.i/24, whose veth peer hm-v<i> is a
# port of the bridge hm-br in the namespace hm-lab. What runs on a node:
#   node-hm-node-i             the holder: a `sleep` that owns the node's mount namespace, which
#                              has a private tmpfs on /run/wireguard (else all nodes would share
#                              /var/run/wireguard/wg-harness.sock) and the node's /sys. Everything
#                              else enters its network and mount namespace (nsenter -n -m).
#   apiserver-relay-hm-node-i  socat: 127.0.0.1:$api_port in the node -> .lab/run/apiserver.sock,
#                              which the root's apiserver-relay forwards to the real apiserver.
#   mesh-agent-hm-node-i       the agent (when built), state in .lab/nodes/hm-node-i/; it spawns
#                              wireguard-go, which daemonizes (`down` finds it via `ip netns pids`).
# The names are those of the pid files in .lab/pids/ and the logs in .lab/logs/.

socat_bin="$(command -v socat 2>/dev/null || echo /usr/bin/socat)"

# shellcheck source=e2e/lab/kubelet.sh
. "$here/kubelet.sh"
# shellcheck source=e2e/lab/vm.sh
. "$here/vm.sh"
# shellcheck source=e2e/lab/nat.sh
. "$here/nat.sh"
# shellcheck source=e2e/lab/podman.sh
. "$here/podman.sh"

# The holder's script: $0 becomes its argv[0] ("$lab/holder/hm-node-i"), which names the lab, so
# `down` finds a holder even without its pid file. The holder's mount namespace is a slave of the
# root's: namespaces that `ip netns add/delete` makes or removes later show up there too (so no node
# pins another node's namespace), while its own tmpfs stays private to it.
# shellcheck disable=SC2016 # $0 is for the holder's shell
holder_script='set -e
mount -t tmpfs -o mode=0700,size=16m hm-wireguard /run/wireguard
if [ "${1:-}" = without-tun ]; then mount -t tmpfs -o mode=0755,size=1m hm-no-tun /dev/net; fi
exec -a "$0" sleep infinity'

netns_exists() { [ -e "/run/netns/$1" ]; }

# The lab's node namespaces, hm-node-1..N in numeric order.
lab_nodes() {
  lab_netns | awk -F- '/^hm-node-[1-9][0-9]*$/ { print $3 }' | sort -n | sed 's/^/hm-node-/'
}

# The number of the highest node that exists (0 if none), SSH nodes aside.
nodes_present() {
  local node m=0
  for node in $(lab_nodes); do
    if ! is_ssh_node "$node" && [ "${node#hm-node-}" -gt "$m" ]; then m="${node#hm-node-}"; fi
  done
  echo "$m"
}

# True if node $1 is an SSH node (lab.sh ssh-node): sshd instead of an agent, no MeshNode. `up`
# leaves it alone; `ssh-node` makes and repairs it.
is_ssh_node() { [ -e "$nodes_dir/$1.ssh" ]; }

holder_pid() { pid_of "node-$1" "$lab/holder/$1"; }
sshd_pid() { pid_of "sshd-$1" comm:sshd; }
node_relay_pid() { pid_of "apiserver-relay-$1" "$socat_bin"; }
agent_pid() { pid_of "mesh-agent-$1" "$bin_dir/mesh-agent"; }
relay_pid() { pid_of apiserver-relay "$socat_bin"; }

# Prints the node named by $1 (hm-node-N or N, or a NAT node hm-nat-K); dies on anything else.
node_name() {
  if is_nat_name "$1"; then
    echo "$1"
    return 0
  fi
  local n="${1#hm-node-}"
  if ! [[ "$n" =~ ^[1-9][0-9]{0,2}$ && "$n" -le $max_nodes ]]; then
    die "not a node name: '$1' (hm-node-1..hm-node-$max_nodes, or just the number)"
  fi
  echo "hm-node-$n"
}

# Dies unless node $1 exists.
require_node() {
  netns_exists "$1" && return 0
  local have
  have="$(lab_nodes | tr '\n' ' ')"
  [ -n "$have" ] || die "no lab node $1: the lab has no nodes (lab.sh up --nodes N)"
  die "no lab node $1: the lab has ${have% }"
}

# Prints the pid of node $1's holder; dies if the node does not exist or has no holder.
running_holder() {
  require_node "$1"
  holder_pid "$1" || die "$1 has no running holder; 'lab.sh up' restarts it"
}

# Fails early when something the nodes need is missing.
preflight_nodes() {
  local tool
  for tool in ip nsenter unshare setsid socat ss; do
    command -v "$tool" >/dev/null || die "$tool is missing: run e2e/lab/install-deps.sh"
  done
  # socat takes ',' and ':' as separators; a unix socket path has at most 107 bytes.
  if [[ "$api_sock" == *[,:!\ ]* ]] || [ ${#api_sock} -gt 107 ]; then
    die "the lab's socket path $api_sock is too long or has one of ',:! ' in it; move the repo"
  fi
}

# The relay in the root namespace: .lab/run/apiserver.sock -> 127.0.0.1:$api_port.
start_relay() {
  local pid _
  if pid="$(relay_pid)"; then return 0; fi
  mkdir -p "$run_dir"
  chmod 700 "$run_dir"
  log "starting the apiserver relay ($api_sock -> 127.0.0.1:$api_port)"
  spawn apiserver-relay "$socat_bin" "$socat_bin" \
    "UNIX-LISTEN:$api_sock,fork,mode=600,unlink-early" "TCP:127.0.0.1:$api_port"
  for _ in $(seq 1 250); do
    [ -S "$api_sock" ] && return 0
    sleep 0.02
  done
  die "the apiserver relay made no socket $api_sock; see $log_dir/apiserver-relay.log"
}

# The holders mount their tmpfs on /run/wireguard, so it has to exist. If the lab makes it, a
# marker tells `down` to remove it again (only if empty).
ensure_run_wireguard() {
  [ -d /run/wireguard ] && return 0
  mkdir -p "$run_dir"
  : >"$run_dir/made-run-wireguard"
  mkdir -m 0700 /run/wireguard
}

ensure_bridge() {
  if netns_exists "$bridge_ns" && [ -n "$(ip -n "$bridge_ns" link show "$bridge" up 2>/dev/null)" ]; then
    return 0
  fi
  log "creating bridge $bridge in namespace $bridge_ns"
  netns_exists "$bridge_ns" || ip netns add "$bridge_ns"
  ip -n "$bridge_ns" link set lo up
  ip -n "$bridge_ns" link show "$bridge" >/dev/null 2>&1 ||
    ip -n "$bridge_ns" link add "$bridge" type bridge
  ip -n "$bridge_ns" link set "$bridge" up
}

# Gives node $1 its namespace, veth pair and address, unless it has them all already. $2 lists the
# bridge ports that are up (one `ip link` call for all nodes).
ensure_node_net() {
  local i="$1" ports="$2" node="hm-node-$1" addr="$node_net.$1/24"
  if netns_exists "$node" && [[ " $ports " == *" hm-v$i "* ]] &&
    [[ "$(ip -n "$node" -o -4 addr show dev eth0 up 2>/dev/null)" == *" inet $addr "* ]]; then
    return 0
  fi
  log "creating node $node (eth0 $addr, peer hm-v$i on $bridge)"
  netns_exists "$node" || ip netns add "$node"
  ip -n "$node" link set lo up
  if ! ip -n "$node" link show eth0 >/dev/null 2>&1; then
    # A bridge end left over by an interrupted `up` goes first.
    ip -n "$bridge_ns" link delete "hm-v$i" >/dev/null 2>&1 || true
    ip -n "$bridge_ns" link add "hm-v$i" type veth peer name eth0 netns "$node"
  fi
  ip -n "$bridge_ns" link set "hm-v$i" master "$bridge" up
  ip -n "$node" addr replace "$addr" dev eth0
  ip -n "$node" link set eth0 up
}

# Starts node $1's holder. Whatever still runs in the node without one (the agent, wireguard-go or
# relay of a holder that died) lives in a mount namespace that is lost: it is stopped first, so the
# node starts afresh.
# A node listed by --without-tun (marker file $nodes_dir/$node.without-tun) gets an empty /dev/net
# in its mount namespace: no /dev/net/tun, so its agent cannot run userspace WireGuard.
start_holder() {
  local node="$1" tun=with-tun
  if [ -e "$nodes_dir/$node.without-tun" ]; then tun=without-tun; fi
  node_hosts_file "$node"
  spawn_holder "$node" slave "$holder_script" "$tun"
}

# Node $1's own /etc/hosts: /etc/netns/NODE/hosts, which `ip netns exec NODE` bind-mounts on
# /etc/hosts (so the holder, everything started in it, and every `ip netns exec NODE` command see
# it, never the host's file). Made from the host's /etc/hosts when missing; `down` removes it.
# Must exist before the holder starts. (Inside e2e/lab/ns.sh, /etc/netns is private to the lab.)
node_hosts_file() {
  local dir="/etc/netns/$1"
  [ -f "$dir/hosts" ] && return 0
  mkdir -p "$dir"
  cp /etc/hosts "$dir/hosts" 2>/dev/null || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$dir/hosts"
  chmod 644 "$dir/hosts"
}

# --resolver for node $1's agent: $lab_resolver, but off unless the holder's /etc/hosts is the
# node's own file (a holder started before node_hosts_file existed shares the host's /etc/hosts,
# which the lab never writes).
agent_resolver() {
  local node="$1" holder="$2"
  [ "$lab_resolver" = hosts ] || { echo "$lab_resolver"; return 0; }
  if [ -f "/etc/netns/$node/hosts" ] &&
    [ "$(nsenter -t "$holder" -m stat -L -c %d:%i /etc/hosts 2>/dev/null)" = "$(stat -L -c %d:%i "/etc/netns/$node/hosts")" ]; then
    echo hosts
  else
    log "warning: $node's /etc/hosts is the host's (its holder predates the lab's per-node hosts files): its agent runs with --resolver off; restart the lab (lab.sh down; up) for hosts"
    echo off
  fi
}

# Starts node $1's holder: `bash -c "$3" ARGV0 "$4"...` in the node's network namespace and a
# mount namespace of its own with propagation $2 (slave, or private in kubelet mode), named
# $lab/holder/NODE. Whatever still runs in the node without a holder lives in a lost mount
# namespace and is stopped first.
spawn_holder() {
  local node="$1" propagation="$2" script="$3" pids=()
  shift 3
  mapfile -t pids < <(ip netns pids "$node" 2>/dev/null || true)
  [ ${#pids[@]} -eq 0 ] || stop_pids "what is left in $node without a holder" "${pids[@]}"
  spawn "node-$node" "$lab/holder/$node" ip netns exec "$node" \
    unshare --mount --propagation "$propagation" -- bash -c "$script" "$lab/holder/$node" "$@"
}

# True when something listens on 127.0.0.1:$api_port in the network namespace of process $1.
relay_listening() {
  [ -n "$(nsenter -t "$1" -n ss -Hltn "src 127.0.0.1:$api_port" 2>/dev/null)" ]
}

# Node $1's state directory, holder and API-server relay (only what is missing); a relay started
# here is added to the global new_relays ("node:holder pid") for wait_new_relays.
start_node_runtime() {
  local node="$1" holder
  mkdir -p "$nodes_dir/$node"
  chmod 700 "$nodes_dir" "$nodes_dir/$node"
  if ! holder="$(holder_pid "$node")"; then
    start_holder "$node"
    holder="$(holder_pid "$node")"
  fi
  if ! node_relay_pid "$node" >/dev/null; then
    spawn "apiserver-relay-$node" "$socat_bin" nsenter -t "$holder" -n -m -- "$socat_bin" \
      "TCP-LISTEN:$api_port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$api_sock"
    new_relays+=("$node:$holder")
  fi
}

# Waits (bounded) until every relay in new_relays listens.
wait_new_relays() {
  local node deadline=$((SECONDS + wait_seconds))
  for node in "${new_relays[@]}"; do
    until relay_listening "${node#*:}"; do
      [ $SECONDS -lt $deadline ] ||
        die "the relay on ${node%%:*} does not listen; see $log_dir/apiserver-relay-${node%%:*}.log"
      sleep 0.02
    done
  done
}

# Node namespaces hm-node-1..$1 with their holders and relays (only what is missing), the bridge
# that joins them, and a MeshNode for each.
start_nodes() {
  local nodes="$1"
  [ "$nodes" -gt 0 ] || return 0
  start_relay
  ensure_run_wireguard
  ensure_bridge
  local ports i node
  new_relays=()
  ports="$(ip -n "$bridge_ns" -o link show master "$bridge" up |
    awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | tr '\n' ' ')"
  for ((i = 1; i <= nodes; i++)); do
    node="hm-node-$i"
    if is_ssh_node "$node"; then continue; fi
    ensure_node_net "$i" "$ports"
    start_node_runtime "$node"
  done
  wait_new_relays
  apply_meshnodes "$nodes"
}

# One MeshNode hm-node-i per node. Server-side apply with an empty spec owns no spec field, so it
# is a no-op for a MeshNode that exists and never undoes what tests set.
apply_meshnodes() {
  local nodes="$1" i
  for ((i = 1; i <= nodes; i++)); do
    if is_ssh_node "hm-node-$i"; then continue; fi
    printf -- '---\napiVersion: mesh.harness.dev/v1alpha1\nkind: MeshNode\nmetadata:\n  name: hm-node-%s\nspec: {}\n' "$i"
  done | lab_kubectl apply --server-side --field-manager=harness-mesh-lab -f - >/dev/null
}

# Links the built agent into .lab/bin; fails if it is not built.
link_agent() {
  local built="${HM_AGENT_BIN:-$repo/target/debug/mesh-agent}"
  [ -x "$built" ] || return 1
  mkdir -p "$bin_dir"
  ln -sf "$built" "$bin_dir/mesh-agent"
}

# Writes node $1's agent kubeconfig with a token of the chart's agent ServiceAccount bound to a
# Pod object on that node, exactly what a DaemonSet pod's projected token is: the API server
# names the node in it, and the chart's node restriction confines the agent to its MeshNode
# and Lease. The Pod never runs (plain mode has no kubelet).
write_agent_kubeconfig() {
  local node="$1" pod="mesh-agent-$1" token
  printf '%s\n' "apiVersion: v1" "kind: Pod" "metadata: {name: $pod, namespace: $chart_namespace}" \
    "spec:" "  nodeName: $node" "  serviceAccountName: $agent_sa" \
    "  automountServiceAccountToken: false" \
    "  containers: [{name: mesh-agent, image: harness-mesh.invalid/lab-placeholder}]" |
    lab_kubectl apply -f - >/dev/null
  token="$(lab_kubectl -n "$chart_namespace" create token "$agent_sa" \
    --bound-object-kind Pod --bound-object-name "$pod" --duration=8760h)"
  write_token_kubeconfig "$nodes_dir/$node/kubeconfig" "$token"
}

# Sets container_args to the agent flags that name node $1's container engine socket (lab.sh
# podman; the agent reports no engine while it is absent), or to none for an agent binary that
# does not know --container-socket yet (asked once per lab.sh call, so once per `up`).
agent_knows_container_socket=""
container_args=()
agent_container_args() {
  if [ -z "$agent_knows_container_socket" ]; then
    agent_knows_container_socket=no
    if timeout 10 "$bin_dir/mesh-agent" --help 2>/dev/null | grep -q -e '--container-socket'; then
      agent_knows_container_socket=yes
    fi
  fi
  container_args=()
  if [ "$agent_knows_container_socket" = yes ]; then container_args=(--container-socket "$(podman_sock "$1")"); fi
}

# Starts node $1's mesh-agent on the node (its holder must be running). The pid file holds the
# agent's own pid.
start_agent() {
  local node="$1" holder
  holder="$(running_holder "$node")"
  mkdir -p "$nodes_dir/$node"
  chmod 700 "$nodes_dir" "$nodes_dir/$node"
  write_agent_kubeconfig "$node"
  agent_container_args "$node"
  log "starting mesh-agent on $node (state in $nodes_dir/$node)"
  # LOG_LEVEL is dropped: wireguard-go inherits it, and it makes the userspace apply() hang.
  spawn "mesh-agent-$node" "$bin_dir/mesh-agent" nsenter -t "$holder" -n -m -- \
    env -u LOG_LEVEL NODE_NAME="$node" KUBECONFIG="$nodes_dir/$node/kubeconfig" RUST_LOG="${RUST_LOG:-info}" \
    "$bin_dir/mesh-agent" --state-dir "$nodes_dir/$node" --metrics-addr 127.0.0.1:9464 \
    --lease-namespace "$chart_namespace" --short-name-namespaces "$lab_short_name_namespaces" \
    --resolver "$(agent_resolver "$node" "$holder")" --zone "$(lab_zone)" "${container_args[@]}"
}

# A mesh-agent on each of the nodes 1..$1 that has none running, if the agent is built.
start_agents() {
  local nodes="$1" i
  [ "$nodes" -gt 0 ] || return 0
  if ! link_agent; then
    log "note: $repo/target/debug/mesh-agent is not built, so the nodes run no agent" \
      "(cargo build -p mesh-agent, then up again)"
    return 0
  fi
  for ((i = 1; i <= nodes; i++)); do
    if is_ssh_node "hm-node-$i"; then continue; fi
    agent_pid "hm-node-$i" >/dev/null || start_agent "hm-node-$i"
  done
}

# Refuses to change the ports of a lab that is already (partly) running.
check_config_compatible() {
  [ -f "$config" ] || return 0
  local name running=0 old
  for name in "${components[@]}"; do
    if component_pid "$name" >/dev/null; then running=1; fi
  done
  [ $running = 1 ] || return 0
  old="$(grep -E '^(API_PORT|ETCD_PORT|ETCD_PEER_PORT)=' "$config" | LC_ALL=C sort | tr '\n' ' ')"
  local new="API_PORT=$api_port ETCD_PEER_PORT=$etcd_peer_port ETCD_PORT=$etcd_port "
  [ "$old" = "$new" ] || die "the running lab uses other ports ($old); run 'lab.sh down' first"
}

# The lab's DNS zone (mesh-controller and mesh-agent --zone, the chart's mesh.zone): a running
# lab's (ZONE= in .lab/config), else $HM_LAB_ZONE (e.g. mesh.internal, make e2e-resolver-zone),
# else mesh.local.
lab_zone() {
  local zone=""
  if [ -f "$config" ]; then zone="$(sed -n 's/^ZONE=//p' "$config")"; fi
  echo "${zone:-${HM_LAB_ZONE:-mesh.local}}"
}

write_config() {
  cat >"$config.tmp" <<EOF
NODES=$1
MODE=$2
VM_NODES=${3:-0}
NAT_NODES=${4:-0}
ZONE=$(lab_zone)
API_PORT=$api_port
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
EOF
  mv "$config.tmp" "$config"
}

cmd_up() {
  # Without --mode (or $LAB_MODE), a running lab keeps its mode, and a new one is plain.
  local nodes="${LAB_NODES:-0}" mode="${LAB_MODE:-}" without_tun=() vms="${LAB_VM_NODES:-0}"
  local nats="${LAB_NAT_NODES:-0}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) [ $# -ge 2 ] || die "--nodes needs a value"; nodes="$2"; shift 2 ;;
      --nodes=*) nodes="${1#*=}"; shift ;;
      --mode) [ $# -ge 2 ] || die "--mode needs a value"; mode="$2"; shift 2 ;;
      --mode=*) mode="${1#*=}"; shift ;;
      --without-tun) [ $# -ge 2 ] || die "--without-tun needs a node number"; without_tun+=("$2"); shift 2 ;;
      --without-tun=*) without_tun+=("${1#*=}"); shift ;;
      --vm-nodes) [ $# -ge 2 ] || die "--vm-nodes needs a value"; vms="$2"; shift 2 ;;
      --vm-nodes=*) vms="${1#*=}"; shift ;;
      --nat-nodes) [ $# -ge 2 ] || die "--nat-nodes needs a value"; nats="$2"; shift 2 ;;
      --nat-nodes=*) nats="${1#*=}"; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument to up: $1" ;;
    esac
  done
  local k
  for k in "${without_tun[@]}"; do
    [[ "$k" =~ ^[1-9][0-9]{0,2}$ ]] || die "--without-tun takes a node number, got '$k'"
    if netns_exists "hm-node-$k" && [ ! -e "$nodes_dir/hm-node-$k.without-tun" ]; then
      die "hm-node-$k already exists with /dev/net/tun; --without-tun applies to new nodes only"
    fi
  done
  # 0 (the default) means the control plane only.
  if [ "$nodes" != 0 ] && ! [[ "$nodes" =~ ^[1-9][0-9]{0,2}$ && "$nodes" -le $max_nodes ]]; then
    die "--nodes must be an integer from 0 to $max_nodes, got '$nodes'"
  fi
  if [ -z "$mode" ]; then
    mode=plain
    if component_pid etcd >/dev/null && [ -n "$(lab_mode)" ]; then mode="$(lab_mode)"; fi
  fi
  case "$mode" in plain | kubelet) ;; *) die "--mode must be plain or kubelet, got '$mode'" ;; esac
  [[ "$vms" =~ ^[0-9]$ ]] || die "--vm-nodes must be an integer from 0 to $vm_max, got '$vms'"
  if [ "$vms" -gt 0 ] && [ "$mode" = kubelet ]; then die "VM nodes run in plain mode only"; fi
  if [ "$vms" -gt 0 ] && [ "$nodes" -gt $vm_net_offset ]; then
    die "with VM nodes at most $vm_net_offset namespace nodes (192.168.77.$((vm_net_offset + 1))+ are the VMs')"
  fi
  [[ "$nats" =~ ^[0-9]$ && "$nats" -le $nat_max ]] || die "--nat-nodes must be an integer from 0 to $nat_max, got '$nats'"
  if [ "$nats" -gt 0 ] && [ "$mode" = kubelet ]; then die "NAT nodes run in plain mode only"; fi
  if [ "$nats" -gt 0 ] && [ "$nodes" -gt $nat_net_offset ]; then
    die "with NAT nodes at most $nat_net_offset namespace nodes (192.168.77.$((nat_net_offset + 1))+ are the NAT routers')"
  fi

  lock
  # Namespaces named like this lab's that this clone never made (no config of its own): the
  # leftovers of another clone's lab, or of one whose state was deleted. Adopting them would
  # start an agent in each (CI once ran its 3-node suites among 200 stale nodes); remove them.
  remove_foreign_nodes
  # `up` only adds: nodes that exist beyond the ones asked for stay (`down` removes them).
  local present
  present="$(nodes_present)"
  if [ "$present" -gt "$nodes" ]; then
    if [ "$nodes" != 0 ]; then
      log "note: keeping the $present nodes that exist (asked for $nodes); 'down' removes nodes"
    fi
    nodes="$present"
  fi
  if [ "$(vms_present)" -gt "$vms" ]; then vms="$(vms_present)"; fi
  if [ "$(nats_present)" -gt "$nats" ]; then nats="$(nats_present)"; fi
  mkdir -p "$lab"
  if [ ${#without_tun[@]} -gt 0 ]; then
    mkdir -p "$nodes_dir"
    for k in "${without_tun[@]}"; do touch "$nodes_dir/hm-node-$k.without-tun"; done
  fi
  check_config_compatible
  check_mode_compatible "$mode"
  configure_mode "$mode"
  preflight_ports
  if [ "$nodes" -gt 0 ] || [ "$nats" -gt 0 ]; then preflight_nodes; fi
  if [ "$mode" = kubelet ]; then kubelet_preflight; fi
  ensure_binaries
  if [ "$mode" = kubelet ]; then ensure_kubelet_binaries; fi
  write_config "$nodes" "$mode" "$vms" "$nats"
  ensure_pki
  start_etcd
  start_apiserver
  write_kubeconfig
  wait_for kube-apiserver lab_kubectl get namespace default
  install_crds
  if [ "$mode" = kubelet ]; then
    up_kubelet_mode "$nodes"
  else
    install_chart
    start_nodes "$nodes"
    start_nat_nodes "$nats"
    start_controller
    start_agents "$nodes"
    start_nat_agents "$nats"
    start_vms "$vms"
  fi
  local extra=""
  if [ "$vms" != 0 ]; then extra+=" and $vms VM node(s)"; fi
  if [ "$nats" != 0 ]; then extra+=" and $nats NAT node(s)"; fi
  log "lab is up ($mode mode): KUBECONFIG=$kubeconfig (server https://127.0.0.1:$api_port), $nodes node(s)$extra"
}

# Removes the node namespaces (and what runs in them) when this clone has no lab config: they
# are not this lab's. Refuses while a lab holds this lab's ports (another clone's, running).
remove_foreign_nodes() {
  [ ! -e "$config" ] || return 0
  local ns stale=() pids=()
  for ns in $(lab_netns); do
    [ "$ns" = "$bridge_ns" ] || [[ "$ns" == "${netns_prefix}node-"* ]] || [[ "$ns" == "${netns_prefix}nat"* ]] && stale+=("$ns")
  done
  [ ${#stale[@]} -gt 0 ] || return 0
  preflight_ports
  log "removing ${#stale[@]} network namespace(s) that a lab not of this clone left (${stale[0]}...)"
  for ns in "${stale[@]}"; do
    mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
  done
  [ ${#pids[@]} -eq 0 ] || stop_pids "processes in the stale namespaces" "${pids[@]}"
  for ns in "${stale[@]}"; do ip netns delete "$ns" || log "warning: could not delete network namespace $ns"; done
}

# Refuses to switch the mode of a lab that is already running.
check_mode_compatible() {
  local old
  old="$(lab_mode)"
  if [ -n "$old" ] && [ "$old" != "$1" ] && component_pid etcd >/dev/null; then
    die "the running lab is in $old mode; run 'lab.sh down' before 'up --mode $1'"
  fi
}

# Kubelet mode after the apiserver: controller-manager and scheduler, the nodes with their
# kubelets, then the whole chart; done when every MeshNode is Ready.
up_kubelet_mode() {
  local nodes="$1" i ports
  start_control_plane_extras
  [ "$nodes" -gt 0 ] || return 0
  start_relay
  ensure_bridge
  ports="$(ip -n "$bridge_ns" -o link show master "$bridge" up |
    awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | tr '\n' ' ')"
  for ((i = 1; i <= nodes; i++)); do
    is_ssh_node "hm-node-$i" || ensure_node_net "$i" "$ports"
  done
  start_kubelet_nodes "$nodes"
  # kube-controller-manager exits when etcd times out while it starts its controllers, which a
  # slow shared disk does while the nodes import their images: start it again if so.
  start_control_plane_extras
  install_chart_workloads
  install_cluster_dns
  log "waiting for $nodes MeshNode(s) to become Ready"
  wait_for kube-apiserver meshnodes_ready "$nodes"
}

# --- exec, agent ----------------------------------------------------------------------------

# Runs a command on a node: in the network and mount namespace of its holder, in the caller's
# working directory, with proxy variables unset (nothing outside the lab is reachable from there).
cmd_exec() {
  [ $# -ge 1 ] || die "usage: lab.sh exec NODE [--] CMD [ARG...]"
  local node holder k
  if is_vm_name "$1"; then
    node="$1"
    shift
    if [ "${1:-}" = -- ]; then shift; fi
    [ $# -ge 1 ] || die "usage: lab.sh exec $node [--] CMD [ARG...]"
    [ -d "$vm_dir/$node" ] || die "no VM node $node"
    k="$(vm_index "$node")"
    exec ip netns exec "$bridge_ns" "$bin_dir/lab-vm-exec" run "$(vm_addr "$k"):$vm_exec_port" "$vm_token" -- "$@"
  fi
  if is_nat_router_name "$1"; then
    node="$1"
    shift
    if [ "${1:-}" = -- ]; then shift; fi
    [ $# -ge 1 ] || die "usage: lab.sh exec $node [--] CMD [ARG...]"
    netns_exists "$node" || die "no NAT router $node"
    exec ip netns exec "$node" \
      env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy "$@"
  fi
  node="$(node_name "$1")"
  shift
  if [ "${1:-}" = -- ]; then shift; fi
  [ $# -ge 1 ] || die "usage: lab.sh exec $node [--] CMD [ARG...]"
  holder="$(running_holder "$node")"
  exec nsenter -t "$holder" -n -m --wd="$PWD" -- \
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy "$@"
}

cmd_agent() {
  [ $# -eq 2 ] || die "usage: lab.sh agent start|stop|restart|kill NODE"
  local action="$1" node
  case "$action" in
    start | stop | restart | kill) ;;
    *) die "unknown agent action '$action' (start, stop, restart or kill)" ;;
  esac
  if is_vm_name "$2"; then
    lock
    vm_agent "$action" "$2"
    return
  fi
  node="$(node_name "$2")"
  lock
  if [ "$action" = start ] || [ "$action" = restart ]; then require_lab_up; fi
  require_node "$node"
  if is_ssh_node "$node"; then
    die "$node is an SSH node: it runs sshd, not a lab agent (an enrolled agent there is meshctl's)"
  fi
  if [ "$lab_run_mode" = kubelet ]; then
    [ "$action" = restart ] || die "in kubelet mode the agents are the chart's DaemonSet pods: only 'agent restart' (which deletes $node's agent pod) applies"
    kubelet_agent_restart "$node"
    return 0
  fi
  case "$action" in
    start) agent_start "$node" ;;
    stop) agent_stop "$node" ;;
    restart) agent_stop "$node"; agent_start "$node" ;;
    kill) agent_kill "$node" ;;
  esac
}

require_lab_up() {
  if ! component_pid etcd >/dev/null || ! component_pid kube-apiserver >/dev/null ||
    ! relay_pid >/dev/null; then
    die "the lab is not up; start it with 'lab.sh up --nodes N'"
  fi
}

agent_start() {
  local node="$1" pid
  require_lab_up
  if ! holder_pid "$node" >/dev/null || ! node_relay_pid "$node" >/dev/null; then
    die "$node is not fully up (holder or relay missing); 'lab.sh up' repairs it"
  fi
  link_agent || die "$repo/target/debug/mesh-agent is not built (cargo build -p mesh-agent)"
  if pid="$(agent_pid "$node")"; then
    log "mesh-agent on $node is already running (pid $pid)"
    return 0
  fi
  start_agent "$node"
}

# SIGTERM, then SIGKILL after $LAB_AGENT_STOP_SECONDS.
agent_stop() {
  local node="$1" pid
  if ! pid="$(agent_pid "$node")"; then
    log "mesh-agent on $node is not running"
    return 0
  fi
  # shellcheck disable=SC2034 # read by stop_pids
  local stop_seconds="$agent_stop_seconds"
  stop_pids "mesh-agent on $node" "$pid"
  await_reaped "$pid"
}

agent_kill() {
  local node="$1" pid
  if ! pid="$(agent_pid "$node")"; then
    log "mesh-agent on $node is not running"
    return 0
  fi
  kill_now "mesh-agent on $node" "$pid"
}

# SIGKILL process $2 (described by $1) and wait until it is gone: no chance to finish anything.
kill_now() {
  local label="$1" pid="$2" _
  log "killing $label (pid $pid) with SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    alive "$pid" || break
    sleep 0.1
  done
  ! alive "$pid" || die "$label (pid $pid) survived SIGKILL"
  await_reaped "$pid"
}

# --- controller, apiserver (fault tests) ------------------------------------------------------

cmd_controller() {
  [ $# -eq 1 ] || die "usage: lab.sh controller start|stop|restart|kill"
  local action="$1" pid
  case "$action" in
    start | stop | restart | kill) ;;
    *) die "unknown controller action '$action' (start, stop, restart or kill)" ;;
  esac
  if [ "$lab_run_mode" = kubelet ]; then
    die "in kubelet mode mesh-controller is the chart's Deployment pod, not a lab process: delete its pod instead"
  fi
  lock
  if [ "$action" != start ] && pid="$(component_pid mesh-controller)"; then
    case "$action" in
      kill) kill_now mesh-controller "$pid" ;;
      *) stop_pids mesh-controller "$pid"; await_reaped "$pid" ;;
    esac
  elif [ "$action" != start ]; then
    log "mesh-controller is not running"
  fi
  if [ "$action" = start ] || [ "$action" = restart ]; then
    require_lab_up
    [ -x "$repo/target/debug/mesh-controller" ] ||
      die "$repo/target/debug/mesh-controller is not built (cargo build -p mesh-controller)"
    start_controller
  fi
}

cmd_apiserver() {
  [ $# -eq 1 ] || die "usage: lab.sh apiserver stop|start"
  local pid
  lock
  case "$1" in
    stop)
      if pid="$(component_pid kube-apiserver)"; then
        # It stops listening at once, then drains long watches for up to a minute: no need to wait.
        # shellcheck disable=SC2034 # read by stop_pids
        local stop_seconds="$apiserver_stop_seconds"
        stop_pids kube-apiserver "$pid"
        await_reaped "$pid"
      else
        log "kube-apiserver is not running"
      fi
      ;;
    start)
      component_pid etcd >/dev/null || die "etcd is not running; start the lab with 'lab.sh up'"
      start_apiserver
      ;;
    *) die "unknown apiserver action '$1' (stop or start)" ;;
  esac
}

# --- SSH nodes --------------------------------------------------------------------------------
#
# An SSH node plays a remote Linux machine for `meshctl enroll`: the node's namespace, holder and
# relay as usual, but Debian's sshd on 192.168.77.K:22 instead of a lab agent, and no MeshNode.
# Its holder gives it what a machine of its own has: a private /run (no systemd: an enrolled agent
# runs supervised; /run/sshd for privilege separation; /run/wireguard) and copy-on-write overlays
# of /etc, /usr/local and /var, so whatever is installed or configured there (mesh-agent, its
# kubeconfig and state, the user $ssh_user) lands in .lab/ssh/hm-node-K/upper, never on the host.
#   sshd-hm-node-K   sshd -D -e with .lab/ssh/hm-node-K/sshd_config and its own host key; root
#                    (prohibit-password) and $ssh_user log in with .lab/ssh/client_ed25519.
# `down` stops it with everything else in the node's namespace.

# shellcheck disable=SC2016 # $0, $1 and $dir are for the holder's shell
ssh_holder_script='set -e
state="$1"
mount -t tmpfs -o mode=0755,size=64m hm-run /run
mkdir -m 0700 /run/wireguard
mkdir -m 0755 /run/sshd /run/lock
for dir in etc usr/local var; do
  layer="$(printf %s "$dir" | tr / -)"
  mkdir -p "$state/upper/$layer" "$state/work/$layer"
  mount -t overlay "hm-$layer" -o "lowerdir=/$dir,upperdir=$state/upper/$layer,workdir=$state/work/$layer" "/$dir"
done
exec -a "$0" sleep infinity'

# The client key pair (one for every SSH node) and authorized_keys, readable by $ssh_user too
# (sshd reads it as the user who logs in).
ensure_ssh_client_key() {
  mkdir -p "$ssh_dir"
  chmod 755 "$ssh_dir"
  if [ ! -f "$ssh_dir/client_ed25519" ]; then
    rm -f "$ssh_dir/client_ed25519.pub"
    ssh-keygen -q -t ed25519 -N '' -C harness-mesh-lab-client -f "$ssh_dir/client_ed25519"
  fi
  cp "$ssh_dir/client_ed25519.pub" "$ssh_dir/authorized_keys"
  chmod 644 "$ssh_dir/authorized_keys"
}

# Node $1's host key and sshd config, in $ssh_dir/$1/.
write_sshd_config() {
  local node="$1" dir="$ssh_dir/$1" addr="$node_net.${1#hm-node-}"
  mkdir -p "$dir"
  chmod 700 "$dir"
  [ -f "$dir/ssh_host_ed25519_key" ] ||
    ssh-keygen -q -t ed25519 -N '' -C "$node" -f "$dir/ssh_host_ed25519_key"
  cat >"$dir/sshd_config" <<EOF
# sshd of the lab's SSH node $node (e2e/lab/lab.sh ssh-node): a remote machine for meshctl enroll.
ListenAddress $addr:22
HostKey $dir/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile $ssh_dir/authorized_keys
AllowUsers root $ssh_user
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The repository may live under a world-writable directory (a CI clone in /tmp), whose mode
# StrictModes rejects on the path to authorized_keys. This sshd listens only inside the lab.
StrictModes no
AllowAgentForwarding no
AllowTcpForwarding no
X11Forwarding no
PermitTunnel no
LogLevel VERBOSE
EOF
}

# $ssh_dir/known_hosts: the host key of every SSH node, as an OpenSSH known_hosts file.
write_known_hosts() {
  local dir addr out=()
  for dir in "$ssh_dir"/hm-node-*/; do
    [ -f "$dir/ssh_host_ed25519_key.pub" ] || continue
    addr="$node_net.$(basename "$dir" | sed 's/^hm-node-//')"
    out+=("$addr $(cut -d' ' -f1-2 "$dir/ssh_host_ed25519_key.pub")")
  done
  printf '%s\n' "${out[@]}" >"$ssh_dir/known_hosts.tmp"
  chmod 644 "$ssh_dir/known_hosts.tmp"
  mv "$ssh_dir/known_hosts.tmp" "$ssh_dir/known_hosts"
}

cmd_ssh_node() {
  [ $# -eq 1 ] || die "usage: lab.sh ssh-node K (K = a node number that is not an agent node)"
  local node k holder ports deadline pid
  node="$(node_name "$1")"
  k="${node#hm-node-}"
  [ -x /usr/sbin/sshd ] || die "sshd is missing: run e2e/lab/install-deps.sh (openssh-server)"
  command -v ssh-keygen >/dev/null || die "ssh-keygen is missing: run e2e/lab/install-deps.sh (openssh-client)"
  preflight_nodes
  lock
  if ! component_pid etcd >/dev/null || ! component_pid kube-apiserver >/dev/null; then
    die "the lab is not up; start it with 'lab.sh up --nodes N'"
  fi
  if netns_exists "$node" && ! is_ssh_node "$node"; then
    die "$node is an agent node; choose a number no agent node has (lab.sh status lists them)"
  fi
  mkdir -p "$nodes_dir"
  : >"$nodes_dir/$node.ssh"
  ensure_ssh_client_key
  write_sshd_config "$node"
  write_known_hosts
  start_relay
  ensure_run_wireguard
  ensure_bridge
  ports="$(ip -n "$bridge_ns" -o link show master "$bridge" up |
    awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | tr '\n' ' ')"
  ensure_node_net "$k" "$ports"
  if ! holder="$(holder_pid "$node")"; then
    spawn_holder "$node" slave "$ssh_holder_script" "$ssh_dir/$node"
    holder="$(holder_pid "$node")"
  fi
  if ! node_relay_pid "$node" >/dev/null; then
    spawn "apiserver-relay-$node" "$socat_bin" nsenter -t "$holder" -n -m -- "$socat_bin" \
      "TCP-LISTEN:$api_port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$api_sock"
  fi
  # The unprivileged user, in the node's own /etc (copy-on-write): a shell, no password, no sudo.
  if ! nsenter -t "$holder" -m -- id "$ssh_user" >/dev/null 2>&1; then
    nsenter -t "$holder" -m -- useradd --create-home --home-dir "/var/lib/$ssh_user" \
      --shell /bin/sh --password '*' "$ssh_user"
  fi
  if ! pid="$(sshd_pid "$node")"; then
    log "starting sshd on $node ($node_net.$k:22)"
    spawn "sshd-$node" comm:sshd nsenter -t "$holder" -n -m -- \
      /usr/sbin/sshd -D -e -f "$ssh_dir/$node/sshd_config"
  fi
  deadline=$((SECONDS + wait_seconds))
  until [ -n "$(nsenter -t "$holder" -n ss -Hltn "src $node_net.$k:22" 2>/dev/null)" ]; do
    [ $SECONDS -lt $deadline ] || die "sshd on $node does not listen; see $log_dir/sshd-$node.log"
    sshd_pid "$node" >/dev/null || die "sshd on $node exited; see $log_dir/sshd-$node.log"
    sleep 0.05
  done
  log "SSH node $node is up: ssh -i $ssh_dir/client_ed25519 -o UserKnownHostsFile=$ssh_dir/known_hosts" \
    "root@$node_net.$k (or $ssh_user@...)"
}

# --- down -----------------------------------------------------------------------------------

# Names of the network namespaces the lab owns.
lab_netns() {
  command -v ip >/dev/null || return 0
  ip netns list 2>/dev/null | awk -v p="$netns_prefix" 'index($1, p) == 1 { print $1 }'
}

# True if process $1's command line mentions the lab directory (all lab daemons do).
mentions_lab() {
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *"$lab/"* ]]
}

cmd_down() {
  [ $# -eq 0 ] || die "down takes no arguments"
  if [ -z "$repo" ] || [ "$lab" != "$repo/.lab" ]; then die "refusing to clean up '$lab'"; fi
  lock

  # 1. The agents first, while the apiserver and their relays still run, so that they can shut
  #    down cleanly (give up their Leases, ...).
  local f name pid agents=()
  for f in "$pid_dir"/mesh-agent-*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    if pid="$(pid_of "$name" "$bin_dir/mesh-agent")"; then agents+=("$pid"); fi
  done
  [ ${#agents[@]} -eq 0 ] || stop_pids "mesh-agents" "${agents[@]}"
  # Container engines (lab.sh podman): services, containers, their mount namespaces.
  podman_down
  # VM nodes: their agents, then poweroff.
  stop_vms
  # Kubelet mode: the kubelets, then every container (in pod namespaces, not in hm-* ones).
  kubelet_down_workloads

  # 2. Everything else running inside a lab network namespace (node holders, relays, the
  #    wireguard-go daemons the agents started, kubelets, ...).
  local ns pids=()
  for ns in $(lab_netns); do
    mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
  done
  [ ${#pids[@]} -eq 0 ] || stop_pids "processes in ${netns_prefix}* namespaces" "${pids[@]}"

  # 3. Daemons from pid files: unknown (later) ones first, then the components in reverse order.
  local order=() i
  if [ -d "$pid_dir" ]; then
    for f in "$pid_dir"/*.pid; do
      [ -e "$f" ] || continue
      name="$(basename "$f" .pid)"
      [[ " ${components[*]} " == *" $name "* ]] || order+=("$name")
    done
  fi
  for ((i = ${#components[@]} - 1; i >= 0; i--)); do order+=("${components[$i]}"); done
  for name in "${order[@]}"; do
    f="$pid_dir/$name.pid"
    [ -f "$f" ] || continue
    pid="$(cat "$f" 2>/dev/null || true)"
    if alive "$pid" && mentions_lab "$pid"; then stop_pids "$name" "$pid"; fi
    rm -f "$f"
  done

  # 4. Stragglers: any process whose command line still mentions .lab/ (lost pid files).
  local strays=() p
  for p in $(pgrep -f -- "$(printf '%s' "$lab/" | sed 's/[][\.*^$]/\\&/g')" || true); do
    if [ "$p" = $$ ] || [ "$p" = "$BASHPID" ] || [ "$p" = "$PPID" ]; then continue; fi
    if alive "$p" && mentions_lab "$p"; then strays+=("$p"); fi
  done
  [ ${#strays[@]} -eq 0 ] || stop_pids "leftover lab processes" "${strays[@]}"

  # 5. The namespaces themselves (a late process may have entered one: sweep it again).
  for ns in $(lab_netns); do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    [ ${#pids[@]} -eq 0 ] || stop_pids "processes in $ns" "${pids[@]}"
    log "deleting network namespace $ns"
    ip netns delete "$ns" || log "warning: could not delete network namespace $ns"
  done

  # 6. Any mount under .lab/ (the nodes' tmpfs live in their own mount namespaces, which went
  #    with their processes), /run/wireguard if the lab made it, then the state itself.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done < <(awk -v p="$lab/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
  if [ -f "$run_dir/made-run-wireguard" ]; then rmdir /run/wireguard 2>/dev/null || true; fi
  # 7. The nodes' own hosts files (node_hosts_file).
  local d
  for d in /etc/netns/"$netns_prefix"*; do
    [ -d "$d" ] || continue
    rm -f "$d/hosts"
    rmdir "$d" 2>/dev/null || log "warning: $d has files the lab did not make; left in place"
  done
  [ ${#stopped_pids[@]} -eq 0 ] || await_reaped "${stopped_pids[@]}"
  remove_lab_cgroups
  if [ -e "$lab" ]; then
    rm -rf "$lab"
    log "removed $lab"
  fi
  [ ${#stopped_pids[@]} -eq 0 ] || await_reaped "${stopped_pids[@]}"
  log "lab is down"
}

# --- status ---------------------------------------------------------------------------------

cmd_status() {
  [ $# -eq 0 ] || die "status takes no arguments"
  if [ -f "$config" ]; then
    api_port="$(sed -n 's/^API_PORT=//p' "$config")"
    printf 'config:          %s\n' "$(grep -E '^(NODES|MODE|VM_NODES|NAT_NODES)=' "$config" | tr '\n' ' ')"
  fi
  local name pid up=0
  for name in "${components[@]}"; do
    if pid="$(component_pid "$name")"; then
      printf '%-16s running (pid %s)\n' "$name:" "$pid"
    else
      printf '%-16s stopped\n' "$name:"
      up=3
    fi
  done
  local version
  if [ -f "$pki/admin.key" ] && version="$(api_curl /version 2>/dev/null)"; then
    version="$(printf '%s' "$version" | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')"
    printf '%-16s %s (https://127.0.0.1:%s)\n' "apiserver:" "${version:-unknown}" "$api_port"
    api_curl /readyz >/dev/null 2>&1 || { echo "apiserver:       not ready"; up=3; }
  else
    printf '%-16s unreachable\n' "apiserver:"
    up=3
  fi
  if pid="$(component_pid mesh-controller)"; then
    printf '%-16s running (pid %s)\n' "mesh-controller:" "$pid"
  elif [ -f "$pid_dir/mesh-controller.pid" ]; then
    printf '%-16s stopped\n' "mesh-controller:"
  fi
  local ns nodes
  nodes="$(lab_nodes)"
  if pid="$(relay_pid)"; then
    printf '%-16s running (pid %s), %s\n' "apiserver-relay:" "$pid" "$api_sock"
  elif [ -n "$nodes" ]; then
    printf '%-16s stopped\n' "apiserver-relay:"
    up=3
  fi
  for ns in $(lab_netns); do
    [[ "$ns" =~ ^hm-(node|nat|natr)-[0-9]+$ ]] || printf '%-16s %s\n' "netns:" "$ns"
  done
  # One line per node: its address, holder, relay and agent.
  local node holder relay agent
  for node in $nodes; do
    holder=stopped relay=stopped agent=stopped
    if pid="$(holder_pid "$node")"; then holder="pid $pid"; else up=3; fi
    if pid="$(node_relay_pid "$node")"; then relay="pid $pid"; else up=3; fi
    if is_ssh_node "$node"; then
      agent=stopped
      if pid="$(sshd_pid "$node")"; then agent="pid $pid"; fi
      printf '%-16s %-15s holder %s, relay %s, sshd %s (SSH node)\n' "$node:" "$node_net.${node#hm-node-}" \
        "$holder" "$relay" "$agent"
      continue
    fi
    if [ "$lab_run_mode" = kubelet ]; then
      local kubelet=stopped proxy=stopped
      if pid="$(kubelet_pid "$node")"; then kubelet="pid $pid"; else up=3; fi
      if pid="$(kube_proxy_pid "$node")"; then proxy="pid $pid"; else up=3; fi
      printf '%-16s %-15s holder %s, relay %s, kubelet %s, kube-proxy %s\n' "$node:" \
        "$node_net.${node#hm-node-}" "$holder" "$relay" "$kubelet" "$proxy"
      continue
    fi
    if pid="$(agent_pid "$node")"; then
      agent="pid $pid"
    elif [ ! -e "$bin_dir/mesh-agent" ]; then
      agent="not built"
    fi
    printf '%-16s %-15s holder %s, relay %s, agent %s\n' "$node:" "$node_net.${node#hm-node-}" \
      "$holder" "$relay" "$agent"
  done
  podman_status
  nat_status || up=3
  local vm k
  # The relay on the lab bridge: the VMs' way to the apiserver, and in kubelet mode the
  # `kubernetes` Service's endpoint.
  if [ -n "$(lab_vms)" ] || { [ "$lab_run_mode" = kubelet ] && [ -n "$nodes" ]; }; then
    if pid="$(vm_relay_pid)"; then
      printf '%-16s running (pid %s), %s:%s in %s\n' "bridge-relay:" "$pid" "$bridge_addr" "$api_port" "$bridge_ns"
    else
      printf '%-16s stopped\n' "bridge-relay:"
      up=3
    fi
  fi
  for vm in $(lab_vms); do
    k="$(vm_index "$vm")"
    agent=stopped
    if ! pid="$(vm_pid "$vm")"; then
      printf '%-16s %-15s VM stopped\n' "$vm:" "$(vm_addr "$k")"
      up=3
      continue
    fi
    if vm_exec_within 10 "$vm" /hm/agent-ctl status </dev/null >/dev/null 2>&1; then agent=running; fi
    printf '%-16s %-15s VM (qemu pid %s), agent %s\n' "$vm:" "$(vm_addr "$k")" "$pid" "$agent"
  done
  if [ $up = 0 ]; then printf 'kubeconfig:      %s\n' "$kubeconfig"; fi
  return $up
}

# --- main -----------------------------------------------------------------------------------

# What mode $1 (plain or kubelet; empty: no lab yet) changes: the components and the
# apiserver's flags. The apiserver's flags are files only kubelet mode writes, so they are
# computed when the apiserver is about to start.
lab_run_mode=plain
configure_mode() {
  lab_run_mode="${1:-plain}"
  if [ "$lab_run_mode" = kubelet ]; then
    components=(etcd kube-apiserver kube-controller-manager kube-scheduler)
  else
    components=(etcd kube-apiserver)
  fi
}

# Serialises up/down: a lock on this script file itself (nothing to clean up; daemons are
# started with fd 9 closed so they do not keep holding it).
lock() {
  exec 9<"${BASH_SOURCE[0]}"
  flock -w 300 9 || die "another lab.sh up/down is still running"
}

main() {
  local cmd="${1:-}"
  [ $# -eq 0 ] || shift
  configure_mode "$(lab_mode)"
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    exec) cmd_exec "$@" ;;
    agent) cmd_agent "$@" ;;
    controller) cmd_controller "$@" ;;
    apiserver) cmd_apiserver "$@" ;;
    ssh-node) cmd_ssh_node "$@" ;;
    podman) cmd_podman "$@" ;;
    nat-move) cmd_nat_move "$@" ;;
    help | -h | --help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; log "unknown command: $cmd"; exit 2 ;;
  esac
}

main "$@"
