# shellcheck shell=bash disable=SC2154 # lab.sh, which sources this file, sets the lab's variables
# The lab's kubelet mode (`lab.sh up --mode kubelet`), sourced by lab.sh: real Kubernetes nodes,
# so the chart's DaemonSet and Deployment run as real pods.
#
# On top of the plain lab's etcd + kube-apiserver (then with the Node authorizer, kubelet client
# credentials and an egress selector), the control plane gets kube-controller-manager and
# kube-scheduler. Each node namespace hm-node-N runs:
#   - a holder with its own mount namespace: the node's sysfs, the cgroup v1 hierarchies
#     mounted again (`ip netns exec` hides them), a private tmpfs /run (containerd 1.6 keeps its
#     shim sockets in /run/containerd whatever its config says, and the chart's hostPath
#     /var/run/wireguard must be per node) and a copy-on-write /var (hostPath /var/lib/...);
#   - containerd (Debian 1.6, cgroupfs, restrict_oom_score_adj because these VMs lack
#     CAP_SYS_RESOURCE), with the bridge CNI from Debian's containernetworking-plugins: pod
#     network 10.244.N.0/24 on cni0, routes to the other nodes' pod networks;
#   - a kubelet (cgroupfs driver, failCgroupV1: false, its cgroups under /<lab cgroup>/hm-node-N,
#     clusterDNS 10.96.0.10, clusterDomain cluster.local);
#   - kube-proxy (the pinned K8S_VERSION) in nftables mode, a process like the kubelet (see
#     write_node_config for why not a DaemonSet), with its own client certificate;
#   - an apiserver relay on 127.0.0.1:$api_port (the kubelet, kube-proxy, hostNetwork pods).
# The `kubernetes` Service (10.96.0.1:443) is a Service like any other: the apiserver advertises
# the bridge address $node_net.254 (lease reconciler), where a relay in hm-lab feeds its socket,
# and kube-proxy translates. The hand-made DNAT of 10.96.0.1 that stood in for kube-proxy is gone.
# CoreDNS (pinned, COREDNS_VERSION) is the cluster DNS, Service kube-dns at 10.96.0.10 in
# kube-system: cluster.local, every other name refused (nothing is forwarded), plus the chart's
# mesh.local stub domain, imported from the ConfigMap coredns-custom (install_cluster_dns).
# Images come from no registry: buildah builds them from scratch out of local binaries and their
# shared libraries (pause, mesh-agent, mesh-controller, coredns, and busybox for test pods), and
# `ctr images import` loads them on every node. The chart is installed whole, with those images.
# kubectl logs/exec reach the kubelets through a CONNECT proxy in hm-lab (egress-proxy.py).

kubelet_binaries=(kubelet kube-controller-manager kube-scheduler kube-proxy coredns)
# Addresses: the bridge's own address in hm-lab (the egress proxy dials from there, and the
# apiserver is advertised there: the `kubernetes` Service's endpoint), and each node's pod network.
bridge_addr="$node_net.254"
pod_net_prefix="10.244"
pod_cidr="$pod_net_prefix.0.0/16"
service_cidr="10.96.0.0/16"
# The cluster DNS (CoreDNS) Service's address, and the one the chart's Service in front of the
# agents' DNS is pinned to (the CoreDNS stub domain forwards mesh.local there).
cluster_dns_ip="10.96.0.10"
# CoreDNS runs on this node (its image is imported there only).
cluster_dns_node="hm-node-1"
mesh_dns_ip="10.96.0.53"
egress_sock="$run_dir/egress.sock"
# Image references; the tag is the content hash of what went in, so a rebuilt binary is a new
# image that the chart rolls out.
image_prefix="harness-mesh.local"
image_cache="${XDG_CACHE_HOME:-$HOME/.cache}/harness-mesh/images"
kcm_port="${LAB_KCM_PORT:-10257}"
scheduler_port="${LAB_SCHEDULER_PORT:-10259}"
# The lab's cgroup: every node's kubelet gets /$lab_cgroup/hm-node-N in each v1 hierarchy. The
# name depends on the lab's path, so two labs (say CI in its own namespaces beside a working
# lab) never share one.
lab_cgroup="hm-lab-$(printf '%s' "$lab" | sha256sum | cut -c1-8)"
cgroup_controllers=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)

# The holder in kubelet mode. $1 = node dir. Mounts are private: they all end with the holder.
# `ip netns exec` has mounted the node's own sysfs on /sys already, which hides the cgroup
# hierarchies: they are mounted again (the same hierarchies, so limits set here are real).
# shellcheck disable=SC2016 # for the holder's shell
kubelet_holder_script='set -e
dir="$1"
mount -t tmpfs -o mode=0755 hm-cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir -p "/sys/fs/cgroup/$c"
  mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mkdir -p "$dir/var-upper" "$dir/var-work"
mount -t overlay hm-var -o "lowerdir=/var,upperdir=$dir/var-upper,workdir=$dir/var-work" /var
mount -t tmpfs -o mode=0755,size=256m hm-run /run
mkdir -p -m 0700 /run/wireguard
mkdir -p /run/lock
exec -a "$0" sleep infinity'

# The mode the running (or last) lab was started in.
lab_mode() { sed -n 's/^MODE=//p' "$config" 2>/dev/null || true; }
is_kubelet_mode() { [ "$(lab_mode)" = kubelet ]; }

kubelet_preflight() {
  local tool
  for tool in containerd ctr runc buildah gcc objcopy nft /usr/bin/python3 openssl; do
    command -v "$tool" >/dev/null || die "$tool is missing (kubelet mode): run e2e/lab/install-deps.sh"
  done
  if [ ! -x /usr/lib/cni/bridge ] || [ ! -x /usr/lib/cni/host-local ]; then
    die "the bridge CNI plugins are missing in /usr/lib/cni: run e2e/lab/install-deps.sh"
  fi
  [ -x /bin/busybox ] || die "/bin/busybox is missing (busybox-static): run e2e/lab/install-deps.sh"
  if [ ! -d /sys/fs/cgroup/pids ] || [ ! -d /sys/fs/cgroup/memory ]; then
    die "kubelet mode needs the cgroup v1 hierarchies under /sys/fs/cgroup (found: $(find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -printf '%f '))"
  fi
}

ensure_kubelet_binaries() {
  local paths=() i
  mapfile -t paths < <("$here/build-binaries.sh" "${kubelet_binaries[@]}")
  [ ${#paths[@]} -eq ${#kubelet_binaries[@]} ] ||
    die "build-binaries.sh printed ${#paths[@]} paths, expected ${#kubelet_binaries[@]}"
  for i in "${!kubelet_binaries[@]}"; do
    [ -x "${paths[$i]}" ] || die "build-binaries.sh gave no executable for ${kubelet_binaries[$i]}"
    ln -sfn "${paths[$i]}" "$bin_dir/${kubelet_binaries[$i]}"
  done
}

# Signs a client certificate $pki/$1.{crt,key} for subject $2 with the lab CA, and writes the
# kubeconfig $pki/$1.kubeconfig that uses it.
client_kubeconfig() {
  local stem="$1" subject="$2"
  [ -f "$pki/$stem.kubeconfig" ] && return 0
  (
    umask 077
    cd "$pki" || exit 1
    printf '%s\n' "[ext]" "basicConstraints = critical, CA:FALSE" \
      "keyUsage = critical, digitalSignature, keyEncipherment" "extendedKeyUsage = clientAuth" >"$stem.ext"
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$stem.key"
    openssl req -new -key "$stem.key" -subj "$subject" -out "$stem.csr"
    openssl x509 -req -in "$stem.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
      -days 3650 -sha256 -extfile "$stem.ext" -extensions ext -out "$stem.crt" 2>/dev/null
    rm -f "$stem.csr" "$stem.ext"
    cat >"$stem.kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
- name: $stem
  user: {client-certificate: "$pki/$stem.crt", client-key: "$pki/$stem.key"}
contexts:
- name: lab
  context: {cluster: lab, user: $stem}
current-context: lab
EOF
    mv "$stem.kubeconfig.tmp" "$stem.kubeconfig"
  )
}

# The apiserver's extra flags in kubelet mode (start_apiserver adds them).
kubelet_apiserver_args() {
  cat >"$lab/egress-selector.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: $egress_sock
EOF
  # The `kubernetes` Service's endpoint is the bridge address in hm-lab, where a relay
  # (apiserver-relay-hm-lab) feeds the apiserver's socket: pods and nodes reach it through
  # kube-proxy like any Service. The apiserver keeps it itself (lease reconciler), as in a real
  # cluster; it only publishes the address and never dials it. These flags come after
  # start_apiserver's --advertise-address=127.0.0.1 --endpoint-reconciler-type=none: the last
  # one wins.
  printf '%s\n' --authorization-mode=Node,RBAC \
    --advertise-address="$bridge_addr" --endpoint-reconciler-type=lease \
    --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key" \
    --kubelet-preferred-address-types=InternalIP \
    --egress-selector-config-file="$lab/egress-selector.yaml"
}

# kube-controller-manager and kube-scheduler, on 127.0.0.1, no leader election.
start_control_plane_extras() {
  client_kubeconfig kube-controller-manager "/CN=system:kube-controller-manager"
  client_kubeconfig kube-scheduler "/CN=system:kube-scheduler"
  if ! component_pid kube-controller-manager >/dev/null; then
    log "starting kube-controller-manager"
    local kcm="$pki/kube-controller-manager.kubeconfig"
    daemon kube-controller-manager --kubeconfig="$kcm" --authentication-kubeconfig="$kcm" \
      --authorization-kubeconfig="$kcm" --bind-address=127.0.0.1 --secure-port="$kcm_port" \
      --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
      --use-service-account-credentials=true --cluster-signing-cert-file="$pki/ca.crt" \
      --cluster-signing-key-file="$pki/ca.key" --service-cluster-ip-range=10.96.0.0/16 \
      --leader-elect=false
  fi
  if ! component_pid kube-scheduler >/dev/null; then
    log "starting kube-scheduler"
    local sched="$pki/kube-scheduler.kubeconfig"
    daemon kube-scheduler --kubeconfig="$sched" --authentication-kubeconfig="$sched" \
      --authorization-kubeconfig="$sched" --bind-address=127.0.0.1 --secure-port="$scheduler_port" \
      --leader-elect=false
  fi
}

# The egress proxy in hm-lab, which needs the bridge to have an address on the node network.
start_egress_proxy() {
  ip -n "$bridge_ns" addr replace "$bridge_addr/24" dev "$bridge"
  # Debian's python3, not a version manager's shim (which would exec under another argv[0]).
  local python=/usr/bin/python3
  pid_of egress-proxy "$python" >/dev/null && return 0
  log "starting the kubelet egress proxy ($egress_sock -> $node_net.0/24)"
  spawn egress-proxy "$python" ip netns exec "$bridge_ns" "$python" "$here/egress-proxy.py" \
    "$egress_sock" "$node_net.0/24"
}

# --- images ---------------------------------------------------------------------------------

# Builds image $1 (name) from files "SRC=DST" ($3...), with entrypoint $2, plus every shared
# library they load, into a docker-archive tarball in the image cache named by the content hash.
# Prints the tarball's path; the reference is $image_prefix/$1:lab-<hash>.
build_image() {
  local name="$1" entry="$2"; shift 2
  local root="$lab/images/$name.root" spec src dst lib hash tar
  rm -rf "$root"
  mkdir -p "$root/tmp" "$root/etc" "$root/run" "$root/var"
  chmod 1777 "$root/tmp"
  for spec in "$@"; do
    src="${spec%%=*}" dst="${spec#*=}"
    install -D -m 0755 "$src" "$root$dst"
    # Debug info is most of a debug build's size; the image does not need it.
    objcopy --strip-debug "$root$dst" 2>/dev/null || true
    while read -r lib; do
      [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done < <(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' || true)
  done
  echo 'root:x:0:0:root:/root:/sbin/nologin' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  hash="$(cd "$root" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)"
  tar="$image_cache/$name-$hash.tar"
  if [ ! -s "$tar" ]; then
    log "building image $image_prefix/$name:lab-$hash"
    mkdir -p "$image_cache"
    local b=(buildah --root "$lab/buildah/root" --runroot "$lab/buildah/run" --storage-driver vfs)
    local ref="$image_prefix/$name:lab-$hash" c
    c="$("${b[@]}" from scratch)"
    "${b[@]}" copy "$c" "$root/" / >/dev/null
    "${b[@]}" config --entrypoint "[\"$entry\"]" --env PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin \
      --os linux --arch amd64 "$c"
    "${b[@]}" commit -q --format docker "$c" "$ref" >/dev/null
    rm -f "$tar.tmp"
    "${b[@]}" push -q "$ref" "docker-archive:$tar.tmp:$ref" >/dev/null
    "${b[@]}" rm "$c" >/dev/null
    mv "$tar.tmp" "$tar"
  fi
  # The cache is shared by every checkout's lab (a CI clone in e2e/lab/ns.sh beside a working
  # tree, each with its own build): keep the 4 builds of this image used last, not just this one,
  # so that one lab never deletes the image another is importing.
  touch "$tar"
  find "$image_cache" -name "$name-*.tar" -printf '%T@ %p\n' | sort -rn | tail -n +5 | cut -d' ' -f2- |
    xargs -r rm -f
  rm -rf "$root"
  echo "$tar"
}

# The reference of the image in tarball $1 (<name>-<hash>.tar).
image_ref() {
  local file="${1##*/}"
  file="${file%.tar}"
  echo "$image_prefix/${file%-*}:lab-${file##*-}"
}

# The image reference of $1 (pause, mesh-agent, mesh-controller, coredns, busybox) in this lab.
lab_image() {
  local tar
  tar="$(grep -E "/$1-[0-9a-f]{12}\.tar\$" "$lab/images.list")" || die "no $1 image built: lab.sh up --mode kubelet"
  image_ref "$tar"
}

# Builds every image the kubelet nodes need (cached by content); lists them in $lab/images.list.
build_images() {
  local agent="$repo/target/debug/mesh-agent" controller="$repo/target/debug/mesh-controller" wg_go
  if [ ! -x "$agent" ] || [ ! -x "$controller" ]; then
    die "kubelet mode runs the chart's images, built from target/debug/mesh-{agent,controller}: cargo build -p mesh-agent -p mesh-controller"
  fi
  wg_go="$(command -v wireguard-go)" || die "wireguard-go is missing: run e2e/lab/install-deps.sh"
  mkdir -p "$lab/images"
  local pause_bin="$lab/images/pause"
  gcc -Os -static -o "$pause_bin" "$here/images/pause.c"
  {
    build_image pause /pause "$pause_bin=/pause"
    build_image mesh-agent /usr/local/bin/mesh-agent "$agent=/usr/local/bin/mesh-agent" \
      "$wg_go=/usr/local/bin/wireguard-go" "$(command -v nft)=/usr/sbin/nft" \
      "$(command -v wg)=/usr/bin/wg" "$(command -v ip)=/usr/sbin/ip"
    build_image mesh-controller /usr/local/bin/mesh-controller "$controller=/usr/local/bin/mesh-controller"
    # With openssl: busybox wget runs `openssl s_client` for https when it finds it; its own TLS
    # fails the handshake with Go servers (the apiserver: alert 40).
    build_image busybox /bin/sh /bin/busybox=/bin/busybox /bin/busybox=/bin/sh \
      "$(command -v openssl)=/usr/bin/openssl"
    # A static Go binary: the image is the binary alone.
    build_image coredns /usr/local/bin/coredns "$bin_dir/coredns=/usr/local/bin/coredns"
  } >"$lab/images.list.tmp"
  mv "$lab/images.list.tmp" "$lab/images.list"
}

# --- nodes ----------------------------------------------------------------------------------

containerd_pid() { pid_of "containerd-$1" containerd; }
kubelet_pid() { pid_of "kubelet-$1" "$bin_dir/kubelet"; }
kube_proxy_pid() { pid_of "kube-proxy-$1" "$bin_dir/kube-proxy"; }

# Node $1's cgroup root in every v1 hierarchy (cpuset needs its cpus and mems filled in), and the
# cgroups $2... (paths relative to each hierarchy's root, below the node's: its engine's, say).
ensure_node_cgroups() {
  local node="$1" c dir rel
  shift
  for c in "${cgroup_controllers[@]}"; do
    local dirs=("/sys/fs/cgroup/$c/$lab_cgroup" "/sys/fs/cgroup/$c/$lab_cgroup/$node")
    for rel in "$@"; do dirs+=("/sys/fs/cgroup/$c/$rel"); done
    for dir in "${dirs[@]}"; do
      mkdir -p "$dir"
      if [ "$c" = cpuset ]; then
        [ -s "$dir/cpuset.cpus" ] || cat "$(dirname "$dir")/cpuset.cpus" >"$dir/cpuset.cpus"
        [ -s "$dir/cpuset.mems" ] || cat "$(dirname "$dir")/cpuset.mems" >"$dir/cpuset.mems"
      fi
    done
  done
}

# Node $1 (number $2)'s containerd, CNI and kubelet configuration, under $nodes_dir/$1.
write_node_config() {
  local node="$1" i="$2" dir="$nodes_dir/$1" pause
  pause="$(lab_image pause)"
  mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/cni/ipam" "$dir/kubelet" "$dir/manifests" "$dir/pod-logs"
  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$pause"
    netns_mounts_under_state_dir = true
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$dir/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "$(command -v runc)"
EOF
  cat >"$dir/cni/net.d/10-harness-mesh-lab.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "harness-mesh-lab", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam",
            "ranges": [[{"subnet": "$pod_net_prefix.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  # The node's resolver, which pods with dnsPolicy Default (CoreDNS among them) inherit: their own
  # loopback, where nothing answers, so no query leaves the lab. Pods with ClusterFirst get
  # CoreDNS ($cluster_dns_ip) instead.
  echo 'nameserver 127.0.0.1' >"$dir/resolv.conf"
  cat >"$dir/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$lab_cgroup/$node
cgroupsPerQOS: true
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
staticPodPath: $dir/manifests
podLogsDir: $dir/pod-logs
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: "$pki/ca.crt"}}
authorization: {mode: Webhook}
address: $node_net.$i
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
clusterDomain: cluster.local
resolvConf: $dir/resolv.conf
clusterDNS: [$cluster_dns_ip]
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# The nodes share the machine's disk and memory: eviction only when it is really short, not
# at the default 10 % free disk that a busy build machine is often below.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
makeIPTablesUtilChains: false
EOF
  client_kubeconfig "kubelet-$node" "/O=system:nodes/CN=system:node:$node"
  # kube-proxy runs as a process on the node, as the kubelet does, not as a DaemonSet: it is
  # node plumbing that pods (CoreDNS, the chart's controller) need before they can start, it
  # drives the node's own nft binary (nftables mode execs nft), and as a pod it would still need
  # this kubeconfig to reach the apiserver without the Service it is about to program. Its own
  # client certificate (CN system:kube-proxy, made by start_kubelet_nodes) gets the bootstrap
  # role system:node-proxier. Conntrack: 0 everywhere means "leave the kernel's setting alone"
  # (it would write sysctls).
  # kube-proxy exits when its config file changes (even rewritten the same): a new file replaces
  # it only when it differs, and then the running kube-proxy is stopped here, so that `up`
  # starts it again (rather than finding it still alive a moment before it exits).
  cat >"$dir/kube-proxy-config.yaml.new" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: "$pki/kube-proxy.kubeconfig"}
hostnameOverride: $node
clusterCIDR: $pod_cidr
nodePortAddresses: [primary]
bindAddress: $node_net.$i
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
EOF
  if cmp -s "$dir/kube-proxy-config.yaml.new" "$dir/kube-proxy-config.yaml"; then
    rm -f "$dir/kube-proxy-config.yaml.new"
  else
    local pid
    if pid="$(kube_proxy_pid "$node")"; then stop_pids "kube-proxy on $node (new configuration)" "$pid"; fi
    mv "$dir/kube-proxy-config.yaml.new" "$dir/kube-proxy-config.yaml"
  fi
}

# Node $1 (number $2) as a Kubernetes node: holder, the apiserver relay, kube-proxy, containerd
# with the images, kubelet. Only what is missing is started; the routes to the other
# nodes' pod networks are start_kubelet_nodes's, once every node exists.
start_kubelet_node() {
  local node="$1" i="$2" dir="$nodes_dir/$1" holder
  ensure_node_cgroups "$node"
  write_node_config "$node" "$i"
  if ! holder="$(holder_pid "$node")"; then
    spawn_holder "$node" private "$kubelet_holder_script" "$dir"
    holder="$(holder_pid "$node")"
  fi
  local enter=(nsenter -t "$holder" -n -m --)
  node_relay_pid "$node" >/dev/null ||
    spawn "apiserver-relay-$node" "$socat_bin" "${enter[@]}" "$socat_bin" \
      "TCP-LISTEN:$api_port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$api_sock"
  # The node forwards its pods' traffic. A Service address needs a route before kube-proxy's
  # output hook can translate it (the node has no default route): any will do, the DNAT reroutes.
  "${enter[@]}" sysctl -qw net.ipv4.ip_forward=1
  "${enter[@]}" ip route replace "$service_cidr" dev eth0
  # kube-proxy before the kubelet, so the node's own pods find their Services at once.
  kube_proxy_pid "$node" >/dev/null ||
    spawn "kube-proxy-$node" "$bin_dir/kube-proxy" "${enter[@]}" "$bin_dir/kube-proxy" \
      --config="$dir/kube-proxy-config.yaml" --v=1
  if ! containerd_pid "$node" >/dev/null; then
    spawn "containerd-$node" containerd "${enter[@]}" containerd --config "$dir/containerd/config.toml"
  fi
  local ctr=("${enter[@]}" ctr --address "$dir/containerd/containerd.sock" -n k8s.io) deadline=$((SECONDS + wait_seconds))
  # The kubelet exits when the runtime is not serving yet.
  until "${ctr[@]}" version >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "containerd on $node does not answer; see $log_dir/containerd-$node.log"
    sleep 0.1
  done
  local tar ref have
  have="$("${ctr[@]}" images ls -q 2>/dev/null || true)"
  while read -r tar; do
    ref="$(image_ref "$tar")"
    # CoreDNS's image (80 MB) only where CoreDNS runs, as a registry pull would: three imports at
    # once slow etcd's fsyncs down to timeouts on this shared disk.
    if [[ "$ref" == "$image_prefix/coredns:"* ]] && [ "$node" != "$cluster_dns_node" ]; then continue; fi
    grep -qxF "$ref" <<<"$have" || "${ctr[@]}" images import "$tar" >/dev/null || die "importing $tar on $node failed"
  done <"$lab/images.list"
  if ! kubelet_pid "$node" >/dev/null; then
    spawn "kubelet-$node" "$bin_dir/kubelet" "${enter[@]}" "$bin_dir/kubelet" \
      --config="$dir/kubelet-config.yaml" --kubeconfig="$pki/kubelet-$node.kubeconfig" \
      --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" --hostname-override="$node" \
      --node-ip="$node_net.$i" --v=1
  fi
}

# The nodes 1..$1 as Kubernetes nodes, in parallel (image import dominates), then Ready.
start_kubelet_nodes() {
  local nodes="$1" i pids=() pid failed=0
  start_egress_proxy
  # The `kubernetes` Service's endpoint: $bridge_addr:$api_port in hm-lab, a relay to the
  # apiserver's socket (the one VM nodes use, vm.sh).
  vm_relay_ready
  build_images
  client_kubeconfig kube-proxy "/CN=system:kube-proxy"
  for ((i = 1; i <= nodes; i++)); do
    if is_ssh_node "hm-node-$i"; then continue; fi
    mkdir -p "$nodes_dir/hm-node-$i"
    chmod 700 "$nodes_dir" "$nodes_dir/hm-node-$i"
    start_kubelet_node "hm-node-$i" "$i" >"$log_dir/node-up-hm-node-$i.log" 2>&1 &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if [ $failed = 1 ]; then
    for ((i = 1; i <= nodes; i++)); do tail -n 20 "$log_dir/node-up-hm-node-$i.log" >&2 || true; done
    die "a kubelet node did not start (logs above, and in $log_dir)"
  fi
  # Every node routes to every other node's pod network (also to nodes added by a later `up`),
  # and so does hm-lab: pods talk to the `kubernetes` Service's endpoint there ($bridge_addr).
  local n m holder
  for m in $(lab_nodes); do
    ip -n "$bridge_ns" route replace "$pod_net_prefix.${m#hm-node-}.0/24" via "$node_net.${m#hm-node-}"
  done
  for n in $(lab_nodes); do
    holder="$(holder_pid "$n")" || continue
    for m in $(lab_nodes); do
      [ "$n" = "$m" ] || nsenter -t "$holder" -n -- ip route replace "$pod_net_prefix.${m#hm-node-}.0/24" via "$node_net.${m#hm-node-}"
    done
  done
  log "waiting for $nodes Node(s) to become Ready"
  wait_for kube-apiserver nodes_ready "$nodes"
}

# True when $1 Nodes are Ready.
nodes_ready() {
  local ready
  ready="$(lab_kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)"
  [ "$ready" -ge "$1" ]
}

# True when $1 MeshNodes are Ready (the controller mirrors the Nodes; the agents report).
meshnodes_ready() {
  local ready
  ready="$(lab_kubectl get meshnodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)"
  [ "$ready" -ge "$1" ]
}

# The whole chart, with the images built for the nodes, and waits for its pods. The agents serve
# mesh.local on the node addresses too, behind the Service $mesh_dns_ip, and the chart's CoreDNS
# stub domain (ConfigMap coredns-custom in kube-system, the k3s convention) forwards mesh.local
# there; install_cluster_dns imports it. agent.resolver=off: the chart's default (auto, here
# hosts) would mount hostPath /etc/hosts, and the kubelet nodes' holders do not give each node a
# hosts file of its own, so that would be the host's; the plain nodes test --resolver hosts.
install_chart_workloads() {
  local agent controller sum
  agent="$(lab_image mesh-agent)"
  controller="$(lab_image mesh-controller)"
  # Every `up` (each test binary makes one) comes here: helm runs only when the chart or an
  # image changed since the last install, or a pod of the release is not Ready.
  sum="$(cd "$repo" && { find charts/harness-mesh -type f -print0 | sort -z | xargs -0 sha256sum; echo "$agent $controller"; } | sha256sum)"
  if [ -f "$lab/chart-workloads.sum" ] && [ "$(cat "$lab/chart-workloads.sum")" = "$sum" ] &&
    lab_kubectl -n "$chart_namespace" wait --for=condition=Ready --timeout=2s pod --all >/dev/null 2>&1; then
    return 0
  fi
  log "installing the chart (controller ${controller##*:}, agent ${agent##*:}) and waiting for its pods"
  env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY "$bin_dir/helm" upgrade --install \
    "$chart_release" "$repo/charts/harness-mesh" --kubeconfig "$kubeconfig" \
    --namespace "$chart_namespace" --create-namespace --history-max 2 \
    --set controller.image.repository="${controller%:*}" --set controller.image.tag="${controller##*:}" \
    --set controller.image.pullPolicy=Never \
    --set agent.image.repository="${agent%:*}" --set agent.image.tag="${agent##*:}" \
    --set agent.image.pullPolicy=Never \
    --set 'mesh.placementNamespaces={*}' --set "mesh.podCIDRs={$pod_cidr}" \
    --set "mesh.shortNameNamespaces={$lab_short_name_namespaces}" \
    --set agent.resolver=off --set mesh.zone="$(lab_zone)" \
    --set agent.dns.onUnderlay=true --set agent.dns.service.enabled=true \
    --set agent.dns.service.clusterIP="$mesh_dns_ip" --set coreDNS.stubDomain.enabled=true \
    --set coreDNS.stubDomain.configMapName=coredns-custom --set coreDNS.stubDomain.namespace=kube-system \
    --wait --timeout 180s >>"$log_dir/helm.log" 2>&1 || {
    tail -n 20 "$log_dir/helm.log" >&2 || true
    lab_kubectl -n "$chart_namespace" get pods -o wide >&2 || true
    die "helm could not install the chart, or its pods did not become ready within 180 s (helm's output above and in $log_dir/helm.log; kubectl -n $chart_namespace describe pods)"
  }
  echo "$sum" >"$lab/chart-workloads.sum"
}

# The cluster DNS: CoreDNS (the image built from the pinned binary) as the Deployment and Service
# kube-dns ($cluster_dns_ip) in kube-system, the one the kubelets name (clusterDNS). Its Corefile
# answers cluster.local (the kubernetes plugin) and refuses every other name (nothing is
# forwarded: the lab has no network beyond itself), and imports every *.server key of the
# ConfigMap coredns-custom: the chart's stub domain, mesh.local. CoreDNS reads its files only
# when it starts, so the pod template carries a checksum of the Corefile and of that ConfigMap: a
# change (the chart installed after CoreDNS, or with other values) rolls CoreDNS, whatever the
# order. Run after install_chart_workloads, a fresh lab starts CoreDNS once, with the block.
install_cluster_dns() {
  local image custom manifest sum
  image="$(lab_image coredns)"
  custom="$(lab_kubectl -n kube-system get configmap coredns-custom -o jsonpath='{.data}' --ignore-not-found)"
  manifest="$(coredns_manifest "$image" "$(printf '%s\n' "$(coredns_corefile)" "$custom" | sha256sum | cut -c1-16)")"
  sum="$(printf '%s' "$manifest" | sha256sum)"
  if [ -f "$lab/cluster-dns.sum" ] && [ "$(cat "$lab/cluster-dns.sum")" = "$sum" ] &&
    lab_kubectl -n kube-system wait --for=condition=Available --timeout=2s deployment/coredns >/dev/null 2>&1; then
    return 0
  fi
  log "starting the cluster DNS (CoreDNS ${image##*:}, Service kube-dns $cluster_dns_ip)"
  printf '%s\n' "$manifest" | lab_kubectl apply --server-side --force-conflicts \
    --field-manager=harness-mesh-lab -f - >/dev/null
  lab_kubectl -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null || {
    lab_kubectl -n kube-system get pods -l k8s-app=kube-dns -o wide >&2 || true
    die "CoreDNS did not become ready within 120 s (kubectl -n kube-system describe pods -l k8s-app=kube-dns)"
  }
  echo "$sum" >"$lab/cluster-dns.sum"
}

# CoreDNS's configuration.
coredns_corefile() {
  cat <<'EOF'
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        ttl 30
    }
    cache 30
    loadbalance
}
# Any other name: refused. There is nothing to forward to.
.:53 {
    errors
    acl {
        block
    }
}
# The chart's stub domain (mesh.local), and any other *.server block put there.
import /etc/coredns/custom/*.server
EOF
}

# CoreDNS's objects: $1 = image, $2 = checksum of its configuration (a pod annotation).
coredns_manifest() {
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {kind: ServiceAccount, name: coredns, namespace: kube-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
$(coredns_corefile | sed 's/^/    /')
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $cluster_dns_ip
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 53, protocol: TCP}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata:
      labels: {k8s-app: kube-dns}
      annotations: {harness-mesh.dev/config-checksum: "$2"}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      # The node's resolver (nothing): CoreDNS must not query itself.
      dnsPolicy: Default
      terminationGracePeriodSeconds: 5
      tolerations: [{operator: Exists}]
      nodeSelector: {kubernetes.io/hostname: $cluster_dns_node}
      containers:
      - name: coredns
        image: $1
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 1
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          periodSeconds: 10
          failureThreshold: 5
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}
        volumeMounts:
        - {name: config, mountPath: /etc/coredns, readOnly: true}
        - {name: custom, mountPath: /etc/coredns/custom, readOnly: true}
      volumes:
      - name: config
        configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
      - name: custom
        configMap: {name: coredns-custom, optional: true}
EOF
}

# `agent restart NODE` in kubelet mode: delete the node's agent pod and wait for its successor.
kubelet_agent_restart() {
  local node="$1" selector="app.kubernetes.io/component=agent"
  lab_kubectl -n "$chart_namespace" delete pod -l "$selector" --field-selector "spec.nodeName=$node" \
    --wait=true --timeout=60s >/dev/null
  local deadline=$((SECONDS + wait_seconds))
  until lab_kubectl -n "$chart_namespace" wait --for=condition=Ready --timeout=5s pod -l "$selector" \
    --field-selector "spec.nodeName=$node" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "the agent pod on $node did not become Ready again"
    sleep 0.5
  done
}

# `down`, first step in kubelet mode: stop the kubelets (so they restart nothing), then kill
# every process in the lab's cgroups (containers in pod network namespaces are in no hm-*
# namespace).
kubelet_down_workloads() {
  local f name pid kubelets=()
  for f in "$pid_dir"/kubelet-*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"
    if pid="$(pid_of "$name" "$bin_dir/kubelet")"; then kubelets+=("$pid"); fi
  done
  [ ${#kubelets[@]} -eq 0 ] || stop_pids "kubelets" "${kubelets[@]}"
  local procs=()
  if [ -d "/sys/fs/cgroup/pids/$lab_cgroup" ]; then
    mapfile -t procs < <(find "/sys/fs/cgroup/pids/$lab_cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null)
  fi
  if [ ${#procs[@]} -gt 0 ]; then
    log "killing ${#procs[@]} container process(es)"
    kill -KILL "${procs[@]}" 2>/dev/null || true
    stopped_pids+=("${procs[@]}")
  fi
}

# `down`, last step: the lab's cgroups, deepest first (they are empty by now).
remove_lab_cgroups() {
  local c _
  for c in "${cgroup_controllers[@]}"; do
    [ -d "/sys/fs/cgroup/$c/$lab_cgroup" ] || continue
    for _ in 1 2 3 4 5; do
      find "/sys/fs/cgroup/$c/$lab_cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "/sys/fs/cgroup/$c/$lab_cgroup" ] || break
      sleep 0.2
    done
    [ ! -d "/sys/fs/cgroup/$c/$lab_cgroup" ] || log "warning: could not remove cgroup /sys/fs/cgroup/$c/$lab_cgroup"
  done
}
