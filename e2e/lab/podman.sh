# shellcheck shell=bash disable=SC2154 # lab.sh, which sources this file, sets the lab's variables
# A container engine on a lab node (`lab.sh podman start|stop NODE`, `lab.sh podman NODE -- ARGS`),
# sourced by lab.sh: Debian's Podman 4 with its Docker-compatible API on a unix socket, so the
# agent (--container-socket) and the tests meet a real engine, without Docker and without any
# registry.
#
# Per node hm-node-N, all of it in .lab/nodes/hm-node-N/podman/ ($pdir):
#   podman-ns-hm-node-N   a holder (`sleep`, argv[0] .lab/holder/hm-node-N-podman) in the node's
#                         network namespace and in a mount namespace of its own, made inside the
#                         node holder's (so it has the node's /sys and /etc/hosts). It gives the
#                         engine what a machine of its own has (podman_holder_script): a private
#                         tmpfs /run (runroot, libpod's tmp_dir, runc's state and the containers'
#                         /run/netns/netns-* files, none of them on the host's /run), a private
#                         /dev/shm (libpod's lock segment /dev/shm/libpod_lock: one per engine), a
#                         copy-on-write /var (CNI's cache in /var/lib/cni; upper layer on that
#                         tmpfs /run), and the cgroup v1 hierarchies, each
#                         being the subtree /<lab cgroup>/hm-node-N/podman of the real one
#                         (bind-mounted as the root), so podman's /libpod_parent and runc's
#                         cgroups of this node land under the lab's cgroup, where `down` finds
#                         and kills them, and never meet another node's or the host's.
#                         When it ends (podman stop, down) all of that goes: the next start is a
#                         machine booting with its disk (images, container definitions) kept.
#   podman-hm-node-N      `podman system service --time=0 unix://$pdir/podman.sock`, entered into
#                         that namespace: the Docker-compatible API (GET /_ping, /containers/...)
#                         and libpod's own (/v4.x/libpod/...). The socket is a file on the repo's
#                         filesystem, so it is reachable from every mount namespace.
#   `lab.sh podman N -- ARGS` runs the podman CLI in the same namespaces with the same
#   configuration: the same engine state the socket serves.
# Configuration (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF, so the
# host's /etc/containers is never read for these nor changed): runtime runc, cgroupfs, network
# backend CNI with Debian's containernetworking-plugins (netavark is not needed), the default
# network `podman` = the bridge podman0 in the node's namespace, 10.88.N.0/24 (gateway 10.88.N.1),
# no masquerade and no firewall plugin (there is nowhere to go: the node has no route out),
# default ulimits nofile and nproc 1024 (containers did not start in these VMs with podman's own
# defaults), k8s-file logs, events to a file, no registries.
# Storage driver vfs: it works on whatever filesystem the repository lives on (overlay needs one
# that can be an overlay's upper layer, which an overlay root, as in a CI container, cannot), it
# mounts nothing, and the lab's only image is 2 MB (busybox-static), so copying it per container
# costs milliseconds. Image copies go through $pdir/tmp (not /var/tmp on the tmpfs).

podman_bin="$(command -v podman 2>/dev/null || echo /usr/bin/podman)"
# The image every node has after `podman start` (podman_image).
podman_image="localhost/hm-busybox:lab"
podman_stop_seconds="${LAB_PODMAN_STOP_SECONDS:-2}"

podman_dir() { echo "$nodes_dir/$1/podman"; }
podman_sock() { echo "$nodes_dir/$1/podman/podman.sock"; }
podman_holder_pid() { pid_of "podman-ns-$1" "$lab/holder/$1-podman"; }
podman_service_pid() { pid_of "podman-$1" "$podman_bin"; }
# Node $1's podman cgroup, relative to each hierarchy's root.
podman_cgroup() { echo "$lab_cgroup/$1/podman"; }

# The holder of the engine's mount namespace. $1 = $pdir, $2 = the node's podman cgroup.
# shellcheck disable=SC2016 # for the holder's shell
podman_holder_script='set -e
dir="$1" cg="$2"
mount -t tmpfs -o mode=0755,size=256m hm-podman-run /run
mkdir -p /run/lock /run/hm-cgroup
mount -t tmpfs -o mode=1777,size=64m hm-podman-shm /dev/shm
mkdir -p /run/hm-var/upper /run/hm-var/work
mount -t overlay hm-podman-var -o lowerdir=/var,upperdir=/run/hm-var/upper,workdir=/run/hm-var/work /var
rm -rf "$dir/tmp"
mkdir -p "$dir/tmp"
mount -t tmpfs -o mode=0755 hm-podman-cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids systemd; do
  if [ "$c" = systemd ]; then opts=none,name=systemd; else opts="$c"; fi
  mount -t cgroup -o "$opts" cgroup /run/hm-cgroup
  mkdir -p "/sys/fs/cgroup/$c"
  mount --bind "/run/hm-cgroup/$cg" "/sys/fs/cgroup/$c"
  umount /run/hm-cgroup
done
rmdir /run/hm-cgroup
exec -a "$0" sleep infinity'

podman_preflight() {
  local tool
  for tool in "$podman_bin" buildah conmon /usr/sbin/runc curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (lab.sh podman): run e2e/lab/install-deps.sh"
  done
  if [ ! -x /usr/lib/cni/bridge ] || [ ! -x /usr/lib/cni/host-local ]; then
    die "the bridge CNI plugins are missing in /usr/lib/cni: run e2e/lab/install-deps.sh"
  fi
  [ -x /bin/busybox ] || die "/bin/busybox is missing (busybox-static): run e2e/lab/install-deps.sh"
  if [ ! -d /sys/fs/cgroup/pids ] || [ ! -d /sys/fs/cgroup/memory ] || [ ! -d /sys/fs/cgroup/systemd ]; then
    die "lab.sh podman needs the cgroup v1 hierarchies under /sys/fs/cgroup (found: $(find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -printf '%f '))"
  fi
  local sock
  sock="$(podman_sock hm-node-999)"
  [ ${#sock} -le 107 ] || die "the podman socket path $sock is too long for a unix socket; move the repo"
}

# Node $1's containers.conf, storage.conf, registries.conf and CNI network, in $pdir.
write_podman_config() {
  local node="$1" k="${1#hm-node-}" dir
  dir="$(podman_dir "$node")"
  mkdir -p "$dir/cni" "$dir/storage"
  cat >"$dir/containers.conf" <<EOF
# Podman on lab node $node (e2e/lab/podman.sh); read through CONTAINERS_CONF only.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
log_driver = "k8s-file"
# Not the host's resolvers (addresses outside the lab): the node's bridge address, where nothing
# answers unless a test puts something there (podman run --dns overrides it).
dns_servers = ["10.88.$k.1"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["/usr/lib/cni"]
network_config_dir = "$dir/cni"
default_network = "podman"
default_subnet = "10.88.$k.0/24"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
# Containers get 2 s after SIGTERM (Docker: 10 s), then SIGKILL: busybox httpd as PID 1 ignores
# SIGTERM, and the lab stops containers often.
stop_timeout = 2
runtime = "runc"
tmp_dir = "/run/libpod"
static_dir = "$dir/storage/libpod"
volume_path = "$dir/storage/volumes"
image_copy_tmp_dir = "$dir/tmp"

[engine.runtimes]
runc = ["/usr/sbin/runc"]
EOF
  cat >"$dir/storage.conf" <<EOF
# Podman's storage on lab node $node (e2e/lab/podman.sh): vfs on the repo's filesystem; the
# runroot is on the engine's private tmpfs /run.
[storage]
driver = "vfs"
graphroot = "$dir/storage"
runroot = "/run/containers/storage"
EOF
  cat >"$dir/registries.conf" <<EOF
# No registry: short names resolve to nothing, only local images (localhost/...) run.
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
  # host-local keeps its allocations on the engine's tmpfs (they go with it). It hands out
  # addresses round-robin: a container that is stopped and started again gets the next free one.
  # portmap (iptables-nft, in the node's namespace only) makes `-p HOSTPORT:PORT` work on the
  # node's addresses.
  cat >"$dir/cni/podman.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podman",
  "plugins": [
    {"type": "bridge", "bridge": "podman0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "capabilities": {"ips": true},
     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam",
              "ranges": [[{"subnet": "10.88.$k.0/24", "gateway": "10.88.$k.1"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# The environment every podman and buildah command of node $1 runs with.
podman_env() {
  local dir
  dir="$(podman_dir "$1")"
  printf '%s\n' "CONTAINERS_CONF=$dir/containers.conf" "CONTAINERS_STORAGE_CONF=$dir/storage.conf" \
    "CONTAINERS_REGISTRIES_CONF=$dir/registries.conf"
}

# Sets podman_prefix to the command prefix that runs a command in node $1's engine namespace,
# with its configuration and no proxy variables.
podman_prefix=()
podman_prefix_of() {
  local node="$1" holder envs=()
  holder="$(podman_holder_pid "$node")" || die "no container engine on $node: lab.sh podman start $node"
  mapfile -t envs < <(podman_env "$node")
  podman_prefix=(nsenter -t "$holder" -n -m --wd="$PWD" --
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy "${envs[@]}")
}

# Runs "$2..." in node $1's engine namespace (podman_prefix_of).
podman_enter() {
  podman_prefix_of "$1"
  shift
  "${podman_prefix[@]}" "$@"
}

podman_ping() { curl -fsS --max-time 2 --unix-socket "$(podman_sock "$1")" http://d/_ping 2>/dev/null; }

# Builds $podman_image into node $1's storage unless it is there: busybox-static with a symlink
# per applet (at its usual path), /www for httpd, /tmp; no entrypoint, Cmd /bin/sh.
ensure_podman_image() {
  local node="$1" dir root c applet
  podman_enter "$node" "$podman_bin" image exists "$podman_image" && return 0
  log "building $podman_image on $node"
  dir="$(podman_dir "$node")"
  root="$dir/image-root"
  rm -rf "$root"
  mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/etc" "$root/www" \
    "$root/tmp" "$root/root" "$root/var/tmp"
  chmod 1777 "$root/tmp" "$root/var/tmp"
  cp /bin/busybox "$root/bin/busybox"
  while read -r applet; do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done < <(/bin/busybox --list-full)
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$root/etc/group"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  local b=(podman_enter "$node" buildah)
  c="$("${b[@]}" from --pull=false scratch)"
  "${b[@]}" copy "$c" "$root/" / >/dev/null
  "${b[@]}" config --cmd /bin/sh --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --workingdir / --os linux --arch amd64 --label org.opencontainers.image.title=hm-busybox "$c"
  "${b[@]}" commit -q --format docker "$c" "$podman_image" >/dev/null
  "${b[@]}" rm "$c" >/dev/null
  rm -rf "$root"
}

# `lab.sh podman start NODE`: the engine namespace, the API service (answering /_ping) and the
# image, each only if missing.
podman_start() {
  local node="$1" dir holder sock deadline
  podman_preflight
  require_lab_up
  holder="$(running_holder "$node")"
  dir="$(podman_dir "$node")"
  sock="$(podman_sock "$node")"
  mkdir -p "$dir"
  chmod 700 "$nodes_dir/$node"
  write_podman_config "$node"
  ensure_node_cgroups "$node" "$(podman_cgroup "$node")"
  # Traffic to the containers from other nodes (a DNAT on the node) is forwarded.
  nsenter -t "$holder" -n sysctl -qw net.ipv4.ip_forward=1
  if ! podman_holder_pid "$node" >/dev/null; then
    # A service or containers left without a holder live in a lost namespace: stop them first.
    podman_kill_all "$node"
    spawn "podman-ns-$node" "$lab/holder/$node-podman" nsenter -t "$holder" -n -m -- \
      unshare --mount --propagation slave -- bash -c "$podman_holder_script" "$lab/holder/$node-podman" \
      "$dir" "$(podman_cgroup "$node")"
    # spawn returns once the script has exec'd its `sleep` (argv[0] the holder's name), that is
    # once every mount is in place.
  fi
  if ! podman_service_pid "$node" >/dev/null; then
    log "starting podman on $node ($sock)"
    rm -f "$sock"
    local envs=()
    mapfile -t envs < <(podman_env "$node")
    spawn "podman-$node" "$podman_bin" nsenter -t "$(podman_holder_pid "$node")" -n -m -- \
      env "${envs[@]}" "$podman_bin" system service --time=0 "unix://$sock"
  fi
  deadline=$((SECONDS + wait_seconds))
  until [ "$(podman_ping "$node")" = OK ]; do
    [ $SECONDS -lt $deadline ] || die "podman on $node does not answer on $sock; see $log_dir/podman-$node.log"
    podman_service_pid "$node" >/dev/null || {
      tail -n 20 "$log_dir/podman-$node.log" >&2 || true
      die "podman on $node exited; see $log_dir/podman-$node.log"
    }
    sleep 0.05
  done
  ensure_podman_image "$node"
}

# Every process in node $1's podman cgroup (the containers and their conmons), SIGKILLed.
podman_kill_all() {
  local node="$1" procs=() dir
  dir="/sys/fs/cgroup/pids/$(podman_cgroup "$node")"
  [ -d "$dir" ] || return 0
  mapfile -t procs < <(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null)
  [ ${#procs[@]} -gt 0 ] || return 0
  log "killing ${#procs[@]} container process(es) on $node"
  kill -KILL "${procs[@]}" 2>/dev/null || true
  stopped_pids+=("${procs[@]}")
  local pid _ left
  for _ in $(seq 1 50); do
    left=0
    for pid in "${procs[@]}"; do
      if alive "$pid"; then left=1; fi
    done
    [ $left = 1 ] || return 0
    sleep 0.1
  done
  log "warning: container processes on $node still alive after SIGKILL"
}

# `lab.sh podman stop NODE` (and `down`, with $2 = now): stop every container (SIGTERM, SIGKILL
# after $LAB_PODMAN_STOP_SECONDS; `down` kills them at once), the service, then the namespace
# with everything mounted in it. Images and containers stay on disk for the next start.
podman_stop() {
  local node="$1" how="${2:-}" pid
  if [ "$how" != now ] && podman_holder_pid "$node" >/dev/null; then
    podman_enter "$node" "$podman_bin" stop --all --time "$podman_stop_seconds" >/dev/null 2>&1 ||
      log "warning: podman stop --all failed on $node"
  fi
  # shellcheck disable=SC2034 # read by stop_pids
  local stop_seconds="$podman_stop_seconds"
  if pid="$(podman_service_pid "$node")"; then stop_pids "podman on $node" "$pid"; fi
  podman_kill_all "$node"
  if pid="$(podman_holder_pid "$node")"; then stop_pids "the engine namespace of $node" "$pid"; fi
  rm -f "$(podman_sock "$node")"
  # `down` waits for the reaping of everything it stopped once, at its end.
  if [ "$how" != now ] && [ ${#stopped_pids[@]} -gt 0 ]; then await_reaped "${stopped_pids[@]}"; fi
}

# `down`, before the nodes' processes go: every node's engine, at once.
podman_down() {
  local node
  for node in $(lab_nodes); do
    if [ -e "$pid_dir/podman-ns-$node.pid" ] || [ -e "$pid_dir/podman-$node.pid" ] ||
      [ -d "/sys/fs/cgroup/pids/$(podman_cgroup "$node")" ]; then
      podman_stop "$node" now
    fi
  done
}

# One status line per node whose engine runs.
podman_status() {
  local node pid
  for node in $(lab_nodes); do
    pid="$(podman_service_pid "$node")" || continue
    printf '%-16s podman pid %s, %s\n' "$node:" "$pid" "$(podman_sock "$node")"
  done
}

cmd_podman() {
  local usage="usage: lab.sh podman start|stop NODE, or lab.sh podman NODE [--] PODMAN-ARGS..."
  [ $# -ge 1 ] || die "$usage"
  case "$1" in
    start | stop)
      [ $# -eq 2 ] || die "$usage"
      local action="$1" node
      node="$(node_name "$2")"
      if is_nat_name "$node"; then die "lab.sh podman runs on hm-node-N nodes only"; fi
      lock
      require_node "$node"
      if [ "$action" = start ]; then podman_start "$node"; else podman_stop "$node"; fi
      ;;
    *)
      local node
      node="$(node_name "$1")"
      shift
      if [ "${1:-}" = -- ]; then shift; fi
      require_node "$node"
      podman_prefix_of "$node"
      exec "${podman_prefix[@]}" "$podman_bin" "$@"
      ;;
  esac
}
