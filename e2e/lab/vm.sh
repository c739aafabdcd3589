# shellcheck shell=bash disable=SC2154 # lab.sh, which sources this file, sets the lab's variables
# The lab's VM nodes (`lab.sh up --vm-nodes K`), sourced by lab.sh: hm-vm-1..K are QEMU VMs
# (TCG: `-accel tcg -cpu max`; this machine's /dev/kvm cannot run stock kernels) booted with
# Debian's cloud kernel, which has the WireGuard module this machine's kernel lacks. Each VM:
#   - is a member of the lab network: a tap device hm-t<K> on the bridge hm-br in hm-lab (QEMU
#     runs inside hm-lab), eth0 = 192.168.77.(220+K)/24;
#   - runs the real mesh-agent (target/debug, debug info stripped) with --wireguard=kernel, its
#     state in the same path as a namespace node's (.lab/nodes/hm-vm-K, in the VM's own memory),
#     a kubeconfig with a token of the chart's agent ServiceAccount bound to a Pod on hm-vm-K,
#     and the apiserver at https://127.0.0.1:$api_port through a socat in the VM to a relay on
#     the bridge's address in hm-lab ($bridge_addr:$api_port -> .lab/run/apiserver.sock);
#   - is reached by `lab.sh exec hm-vm-K -- CMD` through lab-vm-exec (e2e/src/bin/lab-vm-exec.rs):
#     a command server in the VM on 192.168.77.(220+K):$vm_exec_port, with a per-lab token,
#     and its client run inside hm-lab;
#   - boots from two read-only virtio disks made with `mke2fs -d` (no 9p in the cloud kernel, no
#     loop device): the system image mounted on /usr (host tools and their shared libraries,
#     busybox for the rest, dash as sh, the kernel's modules), cached by content in
#     $HARNESS_MESH_CACHE/vm/ with the initrd (busybox init); and a per-VM payload on /hm (the
#     agent, lab-vm-exec, token, kubeconfig, settings) made on `up`.
# Logs: .lab/logs/vm-hm-vm-K.log (QEMU), vm-hm-vm-K.console.log (the VM's console) and
# mesh-agent-hm-vm-K.log (the agent, written to the VM's second serial port).

# shellcheck disable=SC2034 # read by lab.sh (--vm-nodes)
vm_max=9
vm_net_offset=220
vm_exec_port=7022
vm_dir="$lab/vm"
vm_token="$vm_dir/token"
vm_cache="${HARNESS_MESH_CACHE:-$HOME/.cache/harness-mesh}/vm"
vm_memory="${LAB_VM_MEMORY:-256M}"
vm_boot_seconds="${LAB_VM_BOOT_SECONDS:-180}"
vm_qemu=/usr/bin/qemu-system-x86_64
# What the VMs get from the host (with their shared libraries, per ldd): what the agent runs
# (ip, nft, wg, modprobe) and what tests and people run on nodes.
vm_tools=(/usr/bin/ip /usr/bin/wg /usr/sbin/nft /usr/bin/ping /usr/bin/socat /usr/bin/tcpdump /usr/bin/dig
  /usr/bin/iperf3 /usr/bin/kmod /usr/bin/unshare /usr/bin/nsenter /usr/bin/dash /usr/bin/timeout
  /usr/bin/pkill /usr/bin/pgrep)
# Modules the initrd loads before /usr is mounted (the rest comes from /usr/lib/modules).
vm_early_modules=(virtio_pci virtio_blk)

is_vm_name() { [[ "$1" =~ ^hm-vm-[1-9]$ ]]; }
vm_index() { echo "${1#hm-vm-}"; }
vm_addr() { echo "$node_net.$((vm_net_offset + $1))"; }
vm_pid() { pid_of "vm-$1" "$vm_qemu"; }
vm_relay_pid() { pid_of apiserver-relay-hm-lab "$socat_bin"; }

# The VM nodes that exist (have a directory), in order.
lab_vms() {
  local d
  for d in "$vm_dir"/hm-vm-*/; do
    [ -d "$d" ] && basename "$d"
  done | sort -t- -k3 -n
}

vms_present() { lab_vms | wc -l; }

vm_preflight() {
  local tool
  [ -x "$vm_qemu" ] || die "qemu-system-x86_64 is missing: run e2e/lab/install-deps.sh (qemu-system-x86)"
  for tool in mke2fs cpio gzip depmod objcopy ldd; do
    command -v "$tool" >/dev/null || die "$tool is missing: run e2e/lab/install-deps.sh"
  done
  [ -x /bin/busybox ] || die "busybox is missing: run e2e/lab/install-deps.sh (busybox-static)"
  [ -x "$repo/target/debug/mesh-agent" ] || die "VM nodes need target/debug/mesh-agent: cargo build -p mesh-agent"
  [ -x "$repo/target/debug/lab-vm-exec" ] ||
    die "VM nodes need target/debug/lab-vm-exec: cargo build -p harness-mesh-e2e --bin lab-vm-exec"
}

# Sets vm_kernel (the unpacked kernel directory) and vm_kv (its version).
vm_kernel_ready() {
  vm_kernel="$("$here/vm-kernel.sh")" ||
    die "no VM kernel: run e2e/lab/vm-kernel.sh once with network (outside e2e/lab/ns.sh)"
  vm_kv="${vm_kernel##*/kernel-}"
}

# Copies binary $1 into the /usr tree $2 (as $2/bin/NAME or $2/sbin/NAME) with its libraries.
vm_copy_binary() {
  local src="$1" usr="$2" real rel lib
  real="$(realpath "$src")"
  rel="${real#/usr/}"
  [ "$rel" != "$real" ] || rel="bin/${real##*/}"
  rel="$(dirname "$rel")/${src##*/}" # pkill is a link to pgrep: it needs its own name
  mkdir -p "$usr/$(dirname "$rel")"
  cp -L "$real" "$usr/$rel"
  while read -r lib; do
    [ -n "$lib" ] || continue
    case "$lib" in
      */ld-linux-x86-64.so.2) cp -L "$lib" "$usr/lib64/ld-linux-x86-64.so.2" ;;
      *) cp -L "$lib" "$usr/lib/x86_64-linux-gnu/${lib##*/}" ;;
    esac
  done < <(ldd "$real" 2>/dev/null | grep -o '/[^ ]*' || true)
}

# Sets vm_initrd and vm_system: the cached initrd and system image for this kernel and these
# host tools (rebuilt when this file, the kernel or a tool changes).
vm_system_ready() {
  local key tmp usr r m
  key="$( {
    echo "$vm_kv"
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    stat -L -c '%n %s %Y' "${vm_tools[@]}" /bin/busybox
  } | sha256sum | cut -c1-16)"
  vm_initrd="$vm_cache/system-$key/initrd.gz"
  vm_system="$vm_cache/system-$key/system.img"
  [ -f "$vm_cache/system-$key/.complete" ] && return 0
  log "building the VM system image for kernel $vm_kv in $vm_cache/system-$key (once)"
  mkdir -p "$vm_cache"
  tmp="$(mktemp -d "$vm_cache/.system-$key.XXXXXX")"
  usr="$tmp/usr"
  mkdir -p "$usr"/{bin,sbin,lib/x86_64-linux-gnu,lib64,lib/modules}
  for m in "${vm_tools[@]}"; do vm_copy_binary "$m" "$usr"; done
  ln -s dash "$usr/bin/sh"
  for m in modprobe insmod rmmod lsmod depmod modinfo; do ln -sf ../bin/kmod "$usr/sbin/$m"; done
  ln -sf ../bin/ip "$usr/sbin/ip"
  cp /bin/busybox "$usr/bin/busybox"
  for m in $(/bin/busybox --list); do
    [ -e "$usr/bin/$m" ] || [ -e "$usr/sbin/$m" ] || ln -s busybox "$usr/bin/$m"
  done
  cp -a "$vm_kernel/lib/modules/$vm_kv" "$usr/lib/modules/"
  mke2fs -q -t ext4 -O ^has_journal -L hm-system -d "$usr" "$tmp/system.img" >/dev/null \
    "$(($(du -sm "$usr" | cut -f1) + 48))M"

  # The initrd: busybox init, the early modules, /etc, and symlinks into /usr (Debian's merged
  # layout), so host binaries find /lib64/ld-linux-x86-64.so.2 and their libraries.
  r="$tmp/initrd"
  mkdir -p "$r"/{.hm/mods,proc,sys,dev,run,tmp,usr,hm,etc,root,var/log,mnt}
  cp /bin/busybox "$r/.hm/busybox"
  ln -s .hm/busybox "$r/init"
  for m in bin sbin lib lib64; do ln -s "usr/$m" "$r/$m"; done
  mknod -m 600 "$r/dev/console" c 5 1
  for m in "${vm_early_modules[@]}"; do
    modprobe -d "$vm_kernel" -S "$vm_kv" --show-depends "$m"
  done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$tmp/mods"
  while read -r m; do
    cp "$m" "$r/.hm/mods/"
    basename "$m" >>"$r/.hm/mods/order"
  done <"$tmp/mods"
  vm_write_etc "$r/etc"
  (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp/initrd.gz"
  rm -rf "$usr" "$r" "$tmp/mods"
  rm -rf "$vm_cache/system-$key"
  mv "$tmp" "$vm_cache/system-$key"
  : >"$vm_cache/system-$key/.complete"
}

# /etc of the VMs: busybox init runs /etc/rc, then keeps lab-vm-exec running; poweroff stops
# the agent first.
vm_write_etc() {
  local etc="$1"
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'tcpdump:x:100:100::/nonexistent:/bin/false' \
    'nobody:x:65534:65534::/nonexistent:/bin/false' >"$etc/passwd"
  printf '%s\n' 'root:x:0:' 'tcpdump:x:100:' 'nogroup:x:65534:' >"$etc/group"
  printf '%s\n' '127.0.0.1 localhost' >"$etc/hosts"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files' >"$etc/nsswitch.conf"
  : >"$etc/resolv.conf"
  cat >"$etc/inittab" <<'EOF'
::sysinit:/etc/rc
::respawn:/etc/exec-server
::shutdown:/etc/rc.shutdown
EOF
  cat >"$etc/rc" <<'EOF'
#!/.hm/busybox sh
# The VM node's start: mounts, modules, network, the apiserver relay, the agent.
bb=/.hm/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t tmpfs -o mode=0755 run /run
$bb mount -t tmpfs -o mode=1777 tmp /tmp
echo "HM-VM boot t=$($bb cut -d' ' -f1 /proc/uptime)"
for m in $($bb cat /.hm/mods/order); do $bb insmod "/.hm/mods/$m"; done
n=0
until [ -b /dev/vdb ] || [ $n -ge 100 ]; do $bb sleep 0.05; n=$((n + 1)); done
$bb mount -t ext4 -o ro /dev/vda /usr || echo "HM-VM FAILED: no system disk"
$bb mount -t ext4 -o ro /dev/vdb /hm || echo "HM-VM FAILED: no payload disk"
export PATH=/usr/sbin:/usr/bin
. /hm/env
/usr/sbin/modprobe -a virtio_net tun wireguard nf_tables
/usr/bin/ip link set lo up
n=0
until /usr/bin/ip link show eth0 >/dev/null 2>&1 || [ $n -ge 100 ]; do $bb sleep 0.05; n=$((n + 1)); done
/usr/bin/ip addr add "$HM_ADDR/24" dev eth0
/usr/bin/ip link set eth0 up
$bb hostname "$HM_NODE"
$bb mkdir -p /run/wireguard /var/lib /root "$HM_STATE_DIR"
$bb chmod 700 "$HM_STATE_DIR"
# The apiserver at https://127.0.0.1:$HM_API_PORT, as on every lab node (its certificate names
# 127.0.0.1): relayed to the lab's relay on the bridge.
$bb setsid /usr/bin/socat "TCP-LISTEN:$HM_API_PORT,bind=127.0.0.1,reuseaddr,fork" \
  "TCP:$HM_API_HOST:$HM_API_PORT" </dev/null >/dev/console 2>&1 &
/hm/agent-ctl start
echo "HM-VM ready t=$($bb cut -d' ' -f1 /proc/uptime)"
EOF
  cat >"$etc/exec-server" <<'EOF'
#!/.hm/busybox sh
. /hm/env
exec /hm/bin/lab-vm-exec serve "$HM_ADDR:$HM_EXEC_PORT" /hm/token
EOF
  cat >"$etc/rc.shutdown" <<'EOF'
#!/.hm/busybox sh
[ -x /hm/agent-ctl ] && /hm/agent-ctl stop
echo "HM-VM poweroff t=$(/.hm/busybox cut -d' ' -f1 /proc/uptime)"
EOF
  chmod 755 "$etc/rc" "$etc/exec-server" "$etc/rc.shutdown"
}

# The agent's control script in the VM (lab.sh agent start|stop|restart|kill hm-vm-K runs it).
vm_agent_ctl() {
  cat <<'EOF'
#!/bin/sh
# mesh-agent on this VM node: start | stop | restart | kill | status
. /hm/env
pid() { pidof mesh-agent; }
start() {
  if p="$(pid)"; then echo "mesh-agent is already running (pid $p)"; return 0; fi
  env -u LOG_LEVEL NODE_NAME="$HM_NODE" KUBECONFIG=/hm/kubeconfig RUST_LOG="$HM_RUST_LOG" \
    setsid /hm/bin/mesh-agent --wireguard=kernel --state-dir "$HM_STATE_DIR" \
    --metrics-addr 127.0.0.1:9464 --lease-namespace "$HM_LEASE_NS" \
    --short-name-namespaces "$HM_SHORT_NAME_NAMESPACES" </dev/null >>/dev/ttyS1 2>&1 &
  n=0
  until pid >/dev/null || [ $n -ge 100 ]; do sleep 0.05; n=$((n + 1)); done
  p="$(pid)" || { echo "mesh-agent did not start" >&2; return 1; }
  echo "started mesh-agent (pid $p)"
}
gone() {
  n=0
  while pid >/dev/null; do
    [ $n -lt "$1" ] || return 1
    sleep 0.1
    n=$((n + 1))
  done
}
stop() {
  p="$(pid)" || { echo "mesh-agent is not running"; return 0; }
  kill -TERM $p
  gone $((HM_AGENT_STOP_SECONDS * 10)) && return 0
  echo "mesh-agent did not stop within ${HM_AGENT_STOP_SECONDS}s; sending SIGKILL" >&2
  kill -KILL $p 2>/dev/null
  gone 50
}
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop && start ;;
  kill) p="$(pid)" || exit 0; kill -KILL $p; gone 50 ;;
  status) pid ;;
  *) echo "usage: agent-ctl start|stop|restart|kill|status" >&2; exit 2 ;;
esac
EOF
}

# The stripped agent and lab-vm-exec for the payloads (remade when target/debug changed).
vm_binaries_ready() {
  local name
  mkdir -p "$vm_dir/bin"
  for name in mesh-agent lab-vm-exec; do
    if [ ! -f "$vm_dir/bin/$name" ] || [ "$repo/target/debug/$name" -nt "$vm_dir/bin/$name" ]; then
      objcopy --strip-debug "$repo/target/debug/$name" "$vm_dir/bin/$name.tmp"
      mv "$vm_dir/bin/$name.tmp" "$vm_dir/bin/$name"
    fi
  done
  ln -sf "$repo/target/debug/lab-vm-exec" "$bin_dir/lab-vm-exec"
  if [ ! -f "$vm_token" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$vm_token")
  fi
}

# VM node $1's payload image: the agent, lab-vm-exec, the token, its kubeconfig and settings.
vm_payload() {
  local node="$1" k dir p
  k="$(vm_index "$node")"
  dir="$vm_dir/$node"
  p="$dir/payload"
  rm -rf "$p" "$dir/payload.img"
  mkdir -p "$p/bin" "$nodes_dir/$node"
  chmod 700 "$nodes_dir/$node"
  cp "$vm_dir/bin/mesh-agent" "$vm_dir/bin/lab-vm-exec" "$p/bin/"
  cp "$vm_token" "$p/token"
  write_agent_kubeconfig "$node"
  cp "$nodes_dir/$node/kubeconfig" "$p/kubeconfig"
  vm_agent_ctl >"$p/agent-ctl"
  chmod 755 "$p/agent-ctl"
  cat >"$p/env" <<EOF
HM_NODE=$node
HM_ADDR=$(vm_addr "$k")
HM_EXEC_PORT=$vm_exec_port
HM_API_HOST=$bridge_addr
HM_API_PORT=$api_port
HM_STATE_DIR=$nodes_dir/$node
HM_LEASE_NS=$chart_namespace
HM_SHORT_NAME_NAMESPACES=$lab_short_name_namespaces
HM_RUST_LOG=${RUST_LOG:-info}
HM_AGENT_STOP_SECONDS=$agent_stop_seconds
EOF
  chmod -R go-rwx "$p"
  mke2fs -q -t ext4 -O ^has_journal -L hm-payload -d "$p" "$dir/payload.img" \
    "$(($(du -sm "$p" | cut -f1) + 16))M"
  rm -rf "$p"
}

# The relay VMs reach the apiserver through: $bridge_addr:$api_port in hm-lab -> the unix socket.
# In kubelet mode it is the `kubernetes` Service's endpoint (kubelet.sh).
vm_relay_ready() {
  ip -n "$bridge_ns" addr replace "$bridge_addr/24" dev "$bridge"
  vm_relay_pid >/dev/null && return 0
  log "starting the apiserver relay on the lab bridge ($bridge_addr:$api_port in $bridge_ns)"
  spawn apiserver-relay-hm-lab "$socat_bin" ip netns exec "$bridge_ns" "$socat_bin" \
    "TCP-LISTEN:$api_port,bind=$bridge_addr,reuseaddr,fork" "UNIX-CONNECT:$api_sock"
}

# Boots VM node $1 (its payload, tap device and QEMU); does not wait.
vm_boot() {
  local node="$1" k tap mac
  k="$(vm_index "$node")"
  tap="hm-t$k"
  mac="$(printf '52:54:00:4d:00:%02x' "$((vm_net_offset + k))")"
  vm_payload "$node"
  ip -n "$bridge_ns" link delete "$tap" >/dev/null 2>&1 || true
  ip -n "$bridge_ns" tuntap add dev "$tap" mode tap
  ip -n "$bridge_ns" link set "$tap" master "$bridge" up
  log "booting VM node $node ($(vm_addr "$k"), kernel $vm_kv, tap $tap on $bridge)"
  spawn "vm-$node" "$vm_qemu" ip netns exec "$bridge_ns" "$vm_qemu" \
    -name "$node" -accel tcg -cpu max -m "$vm_memory" -smp 1 -nodefaults -display none \
    -no-reboot -kernel "$vm_kernel/boot/vmlinuz-$vm_kv" -initrd "$vm_initrd" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive "file=$vm_system,if=virtio,format=raw,readonly=on" \
    -drive "file=$vm_dir/$node/payload.img,if=virtio,format=raw,readonly=on" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=n0,mac=$mac" \
    -chardev "file,id=console,path=$log_dir/vm-$node.console.log,append=on" -serial chardev:console \
    -chardev "file,id=agent,path=$log_dir/mesh-agent-$node.log,append=on" -serial chardev:agent
}

# Runs a command on VM node $1 (exit status is the command's; 255 if the VM is unreachable).
vm_exec() {
  local node="$1" k
  shift
  k="$(vm_index "$node")"
  ip netns exec "$bridge_ns" "$bin_dir/lab-vm-exec" run "$(vm_addr "$k"):$vm_exec_port" "$vm_token" -- "$@"
}

# vm_exec bounded: at most $1 seconds.
vm_exec_within() {
  local secs="$1" node="$2" k
  shift 2
  k="$(vm_index "$node")"
  timeout "$secs" ip netns exec "$bridge_ns" "$bin_dir/lab-vm-exec" run "$(vm_addr "$k"):$vm_exec_port" \
    "$vm_token" -- "$@"
}

# Waits until every VM in $@ answers commands (boot) and says how long it took.
vm_wait_up() {
  local node start=$SECONDS deadline=$((SECONDS + vm_boot_seconds))
  for node in "$@"; do
    until vm_exec "$node" true >/dev/null 2>&1 </dev/null; do
      vm_pid "$node" >/dev/null || {
        tail -n 30 "$log_dir/vm-$node.log" "$log_dir/vm-$node.console.log" >&2 || true
        die "VM node $node exited while booting"
      }
      [ $SECONDS -lt $deadline ] || {
        tail -n 30 "$log_dir/vm-$node.console.log" >&2 || true
        die "VM node $node does not answer after ${vm_boot_seconds}s; see $log_dir/vm-$node.console.log"
      }
      sleep 0.5
    done
  done
  [ $# -eq 0 ] || log "VM node(s) $* answer commands ($((SECONDS - start)) s after boot began)"
}

# VM nodes hm-vm-1..$1 (only those missing or stopped), with their MeshNodes.
start_vms() {
  local count="$1" k node booted=()
  [ "$count" -gt 0 ] || return 0
  vm_preflight
  vm_kernel_ready
  vm_system_ready
  link_agent || true
  mkdir -p "$vm_dir" "$bin_dir"
  vm_binaries_ready
  start_relay
  ensure_bridge
  vm_relay_ready
  for ((k = 1; k <= count; k++)); do
    printf -- '---\napiVersion: mesh.harness.dev/v1alpha1\nkind: MeshNode\nmetadata:\n  name: hm-vm-%s\nspec: {}\n' "$k"
  done | lab_kubectl apply --server-side --field-manager=harness-mesh-lab -f - >/dev/null
  for ((k = 1; k <= count; k++)); do
    node="hm-vm-$k"
    mkdir -p "$vm_dir/$node"
    vm_pid "$node" >/dev/null && continue
    vm_boot "$node"
    booted+=("$node")
  done
  vm_wait_up "${booted[@]}"
}

# `down`, first step: each VM's agent stops (while the apiserver still answers it), then the VM
# powers off; QEMU exits by itself (-no-reboot). What is left is stopped with hm-lab's processes.
stop_vms() {
  local node pid pids=() deadline
  for node in $(lab_vms); do
    pid="$(vm_pid "$node")" || continue
    pids+=("$pid")
    log "stopping VM node $node (its agent, then poweroff)"
    { vm_exec_within 15 "$node" /hm/agent-ctl stop && vm_exec_within 5 "$node" poweroff; } \
      </dev/null >/dev/null 2>&1 || log "warning: $node did not take the poweroff command"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  deadline=$((SECONDS + 20))
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  done
}

# The agent actions of lab.sh for a VM node.
vm_agent() {
  local action="$1" node="$2"
  if [ ! -d "$vm_dir/$node" ] || ! vm_pid "$node" >/dev/null; then die "no running VM node $node"; fi
  vm_exec "$node" /hm/agent-ctl "$action" </dev/null
}
