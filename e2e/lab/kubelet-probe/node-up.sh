#!/bin/bash
# usage: OTHERS="2 3" node-up.sh NAME INDEX — netns NAME on k7-br, holder (private mount ns: netns
# sysfs, cgroup v1 hierarchies re-mounted, /var overlay, /run tmpfs), containerd, API relays, kubelet.
set -euo pipefail
name=$1 i=$2 N=/tmp/k7/$1 P=/tmp/k7/pki B=$HOME/.cache/harness-mesh/k8s-v1.37.2
mkdir -p $N/{containerd,cni/net.d,cni/ipam,kubelet,manifests,pod-logs}
ip netns add $name; ip -n $name link set lo up
ip -n k7-lab link add k7-v$i type veth peer name eth0 netns $name
ip -n k7-lab link set k7-v$i master k7-br up
ip -n $name addr add 192.168.177.$i/24 dev eth0; ip -n $name link set eth0 up
for c in cpu cpuacct cpuset memory devices freezer blkio pids systemd; do mkdir -p /sys/fs/cgroup/$c/$name; done
cat /sys/fs/cgroup/cpuset/cpuset.cpus > /sys/fs/cgroup/cpuset/$name/cpuset.cpus
cat /sys/fs/cgroup/cpuset/cpuset.mems > /sys/fs/cgroup/cpuset/$name/cpuset.mems
cat > $N/containerd/config.toml <<EOT
version = 2
root = "$N/containerd/root"
state = "$N/containerd/state"
[grpc]
  address = "$N/containerd/containerd.sock"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$N/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "k7.local/pause:3.10"
    netns_mounts_under_state_dir = true
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$N/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "/usr/sbin/runc"
EOT
cat > $N/cni/net.d/10-k7.conflist <<EOT
{"cniVersion": "1.0.0", "name": "k7-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$N/cni/ipam", "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOT
cat > $N/kubelet-config.yaml <<EOT
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$name
cgroupsPerQOS: true
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$N/containerd/containerd.sock
staticPodPath: $N/manifests
podLogsDir: $N/pod-logs
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $P/ca.crt}}
authorization: {mode: Webhook}
address: 192.168.177.$i
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
clusterDomain: cluster.local
resolvConf: $N/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
makeIPTablesUtilChains: false
EOT
echo 'nameserver 127.0.0.1' > $N/resolv.conf
( cd $P; umask 077
  openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out kubelet-$name.key
  openssl req -new -config openssl.cnf -key kubelet-$name.key -subj "/O=system:nodes/CN=system:node:$name" -out kubelet-$name.csr
  openssl x509 -req -in kubelet-$name.csr -CA ca.crt -CAkey ca.key -set_serial 0x$(openssl rand -hex 16) -days 30 -sha256 -extfile openssl.cnf -extensions client -out kubelet-$name.crt 2>/dev/null
  rm -f kubelet-$name.csr
  cat > kubelet-$name.kubeconfig <<EOT
apiVersion: v1
kind: Config
clusters: [{name: k7, cluster: {server: "https://127.0.0.1:26443", certificate-authority-data: $(base64 -w0 < ca.crt)}}]
users: [{name: u, user: {client-certificate-data: $(base64 -w0 < kubelet-$name.crt), client-key-data: $(base64 -w0 < kubelet-$name.key)}}]
contexts: [{name: k7, context: {cluster: k7, user: u}}]
current-context: k7
EOT
)
sed "s#^N=.*#N=$N#" /tmp/k7/node-holder.sh > $N/holder.sh; chmod +x $N/holder.sh
setsid nsenter --net=/run/netns/$name unshare -m --propagation private $N/holder.sh > /tmp/k7/logs/holder-$name.log 2>&1 < /dev/null &
for _ in $(seq 100); do [ -s $N/holder.pid ] && break; sleep 0.05; done; H=$(cat $N/holder.pid)
setsid nsenter -t $H -m -n containerd --config $N/containerd/config.toml > /tmp/k7/logs/containerd-$name.log 2>&1 < /dev/null &
setsid nsenter -t $H -n -m socat TCP-LISTEN:26443,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:/tmp/k7/run/api.sock > /tmp/k7/logs/relay-$name.log 2>&1 < /dev/null &
setsid nsenter -t $H -n -m socat TCP-LISTEN:26443,bind=192.168.177.$i,reuseaddr,fork UNIX-CONNECT:/tmp/k7/run/api.sock > /tmp/k7/logs/relay-ip-$name.log 2>&1 < /dev/null &
CTR="nsenter -t $H -m -n ctr --address $N/containerd/containerd.sock"
until $CTR version >/dev/null 2>&1; do sleep 0.1; done      # kubelet exits if the CRI is not up yet
for img in /tmp/k7/img/*.tar; do $CTR -n k8s.io images import $img >/dev/null; done
ip netns exec $name sysctl -qw net.ipv4.ip_forward=1
for o in ${OTHERS:-}; do ip -n $name route add 10.244.$o.0/24 via 192.168.177.$o; done
ip -n $name route add 10.96.0.0/16 dev eth0
ip netns exec $name iptables -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination 192.168.177.$i:26443
ip netns exec $name iptables -t nat -A OUTPUT -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination 192.168.177.$i:26443
setsid nsenter -t $H -m -n $B/kubelet --config=$N/kubelet-config.yaml --kubeconfig=$P/kubelet-$name.kubeconfig --root-dir=$N/kubelet --cert-dir=$N/kubelet/pki --hostname-override=$name --node-ip=192.168.177.$i --v=2 > /tmp/k7/logs/kubelet-$name.log 2>&1 < /dev/null &
echo "started $name (holder $H)"
