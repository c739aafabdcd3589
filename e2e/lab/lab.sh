#!/usr/bin/env bash
# The harness-mesh lab: a local Kubernetes control plane (real etcd + kube-apiserver, built from
# pinned sources by e2e/lab/build-binaries.sh) that the tests and the demo run against, on a
# machine without Docker, kind or kernel WireGuard. See e2e/lab/README.md, and the design's
# sections "The lab" and "Lab contract".
#
#   e2e/lab/lab.sh up [--nodes N] [--mode plain|kubelet]   start the lab (idempotent)
#   e2e/lab/lab.sh down                                    stop it all, delete .lab/ (idempotent)
#   e2e/lab/lab.sh status                                  exit 0 if up, 3 if not
#
# All state lives in <repo>/.lab/ (bin/, pki/, etcd/, logs/, pids/, config, kubeconfig).
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
config="$lab/config"

api_port="${LAB_API_PORT:-16443}"
etcd_port="${LAB_ETCD_PORT:-23790}"
controller_metrics_port="${LAB_CONTROLLER_METRICS_PORT:-18080}"
etcd_peer_port="${LAB_ETCD_PEER_PORT:-23800}"
wait_seconds="${LAB_WAIT_SECONDS:-90}"
stop_seconds="${LAB_STOP_SECONDS:-30}"

# Components in start order; `down` stops them in reverse.
components=(etcd kube-apiserver)
# Prefix of every network namespace the lab owns (`down` deletes all of them).
netns_prefix="hm-"
# Node namespaces are hm-node-1..N; the bridge that joins them lives in this namespace.
bridge_ns="hm-lab"
max_nodes=250

log() { printf '[lab] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat <<EOF
Usage: e2e/lab/lab.sh COMMAND [OPTIONS]

The harness-mesh lab: local etcd + kube-apiserver (RBAC on) on 127.0.0.1, state in .lab/.

Commands:
  up [--nodes N] [--mode plain|kubelet]
                 Start the lab; a no-op for what is already running. Writes .lab/kubeconfig.
                 --nodes N   number of node namespaces hm-node-1..N (default: \$LAB_NODES or 0)
                 --mode M    plain (default: \$LAB_MODE or plain) or kubelet
  down           Stop every lab process, delete every hm-* network namespace and .lab/.
  status         Show each component and the apiserver version; exit 0 if up, 3 if not.
  help, --help   This text.

Environment:
  LAB_API_PORT        kube-apiserver secure port   (default 16443)
  LAB_ETCD_PORT       etcd client port             (default 23790)
  LAB_ETCD_PEER_PORT  etcd peer port               (default 23800)
  LAB_CONTROLLER_METRICS_PORT  mesh-controller metrics (default 18080)
  LAB_WAIT_SECONDS    readiness timeout of \`up\`    (default 90)
  LAB_STOP_SECONDS    SIGTERM grace of \`down\`      (default 30)

Everything listens on and talks to 127.0.0.1 only.
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

# Prints the pid of lab component $1 if its pid file names a live process of that binary.
component_pid() {
  local name="$1" pid
  [ -f "$pid_dir/$name.pid" ] || return 1
  pid="$(cat "$pid_dir/$name.pid" 2>/dev/null)" || return 1
  alive "$pid" || return 1
  [ "$(argv0 "$pid")" = "$bin_dir/$name" ] || return 1
  echo "$pid"
}

# Starts "$bin_dir/$1" with the remaining arguments as a session-leader daemon; output goes to
# .lab/logs/$1.log, the pid to .lab/pids/$1.pid. The wrapper shell writes its own pid and then
# execs, so the pid is right even if setsid has to fork. fd 9 (the lab lock) is not inherited.
daemon() {
  local name="$1"; shift
  mkdir -p "$log_dir" "$pid_dir"
  rm -f "$pid_dir/$name.pid"
  # shellcheck disable=SC2016 # $$ and $1 are for the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec nohup "$@"' lab-daemon "$pid_dir/$name.pid" \
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy \
    "$bin_dir/$name" "$@" \
    </dev/null >>"$log_dir/$name.log" 2>&1 9>&- &
  # Wait until the wrapper has exec'd (nohup, env) all the way into the binary, so that
  # component_pid recognises it.
  local _
  for _ in $(seq 1 100); do
    component_pid "$name" >/dev/null && return 0
    sleep 0.05
  done
  log "$name did not start; last lines of $log_dir/$name.log:"
  tail -n 40 "$log_dir/$name.log" >&2 || true
  exit 1
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
  local names=(etcd kube-apiserver kubectl) paths=() i
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
    cat >openssl.cnf <<'EOF'
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
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
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
# forbids advertising anything else. So the `kubernetes` Service has no endpoints in the lab.
start_apiserver() {
  local pid
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
      --authorization-mode=RBAC \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-account-key-file="$pki/sa.pub" \
      --service-account-signing-key-file="$pki/sa.key" \
      --api-audiences=https://kubernetes.default.svc.cluster.local \
      --service-cluster-ip-range=10.96.0.0/16 \
      --allow-privileged=true
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

# The bridge namespace hm-lab and the node namespaces hm-node-1..N (with a mesh-agent each, or
# a kubelet in kubelet mode) arrive with a later change; `down` already cleans up any hm-* netns.
start_nodes() {
  local nodes="$1" mode="$2"
  if [ "$nodes" -gt 0 ]; then
    log "note: --nodes $nodes recorded; node namespaces ($bridge_ns, hm-node-1..$nodes)" \
      "arrive with a later change"
  fi
  if [ "$mode" = kubelet ]; then
    log "note: --mode kubelet recorded; kubelet mode arrives with a later change"
  fi
}

# Installs the CRDs and runs mesh-controller (leader election on, as in a cluster) when the
# workspace has built it (`make lab-up` does: cargo build -p mesh-controller). Metrics on
# 127.0.0.1:$LAB_CONTROLLER_METRICS_PORT.
start_controller() {
  local built="$repo/target/debug/mesh-controller"
  if [ ! -x "$built" ]; then
    log "note: $built is not built, so the lab runs no controller (make lab-up builds it)"
    return 0
  fi
  lab_kubectl apply --server-side --force-conflicts --field-manager=harness-mesh-lab -f "$repo/crds/" >/dev/null
  lab_kubectl wait --for=condition=Established --timeout=60s \
    crd/meshnodes.mesh.harness.dev crd/meshservices.mesh.harness.dev >/dev/null
  ln -sf "$built" "$bin_dir/mesh-controller"
  if component_pid mesh-controller >/dev/null; then return 0; fi
  log "starting mesh-controller (metrics on 127.0.0.1:$controller_metrics_port)"
  KUBECONFIG="$kubeconfig" RUST_LOG="${RUST_LOG:-info}" daemon mesh-controller \
    --metrics-addr="127.0.0.1:$controller_metrics_port" --lease-namespace=kube-system
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

write_config() {
  cat >"$config.tmp" <<EOF
NODES=$1
MODE=$2
API_PORT=$api_port
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
EOF
  mv "$config.tmp" "$config"
}

cmd_up() {
  local nodes="${LAB_NODES:-0}" mode="${LAB_MODE:-plain}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) [ $# -ge 2 ] || die "--nodes needs a value"; nodes="$2"; shift 2 ;;
      --nodes=*) nodes="${1#*=}"; shift ;;
      --mode) [ $# -ge 2 ] || die "--mode needs a value"; mode="$2"; shift 2 ;;
      --mode=*) mode="${1#*=}"; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument to up: $1" ;;
    esac
  done
  # 0 (the default) means the control plane only.
  if [ "$nodes" != 0 ] && ! [[ "$nodes" =~ ^[1-9][0-9]{0,2}$ && "$nodes" -le $max_nodes ]]; then
    die "--nodes must be an integer from 0 to $max_nodes, got '$nodes'"
  fi
  case "$mode" in plain | kubelet) ;; *) die "--mode must be plain or kubelet, got '$mode'" ;; esac

  lock
  mkdir -p "$lab"
  check_config_compatible
  preflight_ports
  ensure_binaries
  write_config "$nodes" "$mode"
  ensure_pki
  start_etcd
  start_apiserver
  write_kubeconfig
  wait_for kube-apiserver lab_kubectl get namespace default
  start_nodes "$nodes" "$mode"
  start_controller
  log "lab is up: KUBECONFIG=$kubeconfig (server https://127.0.0.1:$api_port)"
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

  # 1. Everything running inside a lab network namespace (node agents, kubelets, ...).
  local ns pids=()
  for ns in $(lab_netns); do
    mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
  done
  [ ${#pids[@]} -eq 0 ] || stop_pids "processes in ${netns_prefix}* namespaces" "${pids[@]}"

  # 2. Daemons from pid files: unknown (later) ones first, then the components in reverse order.
  local f name order=() i
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
    local pid
    pid="$(cat "$f" 2>/dev/null || true)"
    if alive "$pid" && mentions_lab "$pid"; then stop_pids "$name" "$pid"; fi
    rm -f "$f"
  done

  # 3. Stragglers: any process whose command line still mentions .lab/ (lost pid files).
  local strays=() p
  for p in $(pgrep -f -- "$(printf '%s' "$lab/" | sed 's/[][\.*^$]/\\&/g')" || true); do
    if [ "$p" = $$ ] || [ "$p" = "$BASHPID" ] || [ "$p" = "$PPID" ]; then continue; fi
    if alive "$p" && mentions_lab "$p"; then strays+=("$p"); fi
  done
  [ ${#strays[@]} -eq 0 ] || stop_pids "leftover lab processes" "${strays[@]}"

  # 4. The namespaces themselves (a late process may have entered one: sweep it again).
  for ns in $(lab_netns); do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    [ ${#pids[@]} -eq 0 ] || stop_pids "processes in $ns" "${pids[@]}"
    log "deleting network namespace $ns"
    ip netns delete "$ns" || log "warning: could not delete network namespace $ns"
  done

  # 5. Any mount under .lab/ (later node setups may mount tmpfs there), then the state itself.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done < <(awk -v p="$lab/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r)
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
    printf 'config:          %s\n' "$(grep -E '^(NODES|MODE)=' "$config" | tr '\n' ' ')"
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
  local ns
  for ns in $(lab_netns); do printf '%-16s %s\n' "netns:" "$ns"; done
  if [ $up = 0 ]; then printf 'kubeconfig:      %s\n' "$kubeconfig"; fi
  return $up
}

# --- main -----------------------------------------------------------------------------------

# Serialises up/down: a lock on this script file itself (nothing to clean up; daemons are
# started with fd 9 closed so they do not keep holding it).
lock() {
  exec 9<"${BASH_SOURCE[0]}"
  flock -w 300 9 || die "another lab.sh up/down is still running"
}

main() {
  local cmd="${1:-}"
  [ $# -eq 0 ] || shift
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    help | -h | --help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; log "unknown command: $cmd"; exit 2 ;;
  esac
}

main "$@"
