#!/usr/bin/env bash
# Installs what the lab and the test suite need and a fresh Debian machine may lack: Debian
# packages (with apt-get, only those missing) and the Rust components rustfmt and clippy.
# Cheap when everything is there already; `make lab-up`, `make test` and .ci/run call it.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*" >&2; }

# package:command pairs (or package:/path); a package is installed when its command (file) is missing. The lab's nodes
# need the second line: userspace WireGuard and its tools, the apiserver relay (socat), and what
# tests and people run on nodes (nft, tcpdump, iperf3, ping). The third: meshctl enroll's SSH
# client, and the sshd of the lab's SSH nodes (lab.sh ssh-node), which play remote machines. The
# fourth: the kubelet mode's nodes (containerd, runc, the bridge CNI plugins) and its images,
# built without a registry (buildah; gcc and libc6-dev for the static pause binary; objcopy to
# strip debug info; busybox-static for test pods; python3 for the egress proxy). The fifth: the
# VM nodes (lab.sh up --vm-nodes K): QEMU, and what builds their kernel modules' index, initrd
# and disk images (depmod, cpio, mke2fs), and conntrack, with which the NAT tests flush a NAT
# router's state (lab.sh up --nat-nodes K). The last: systemd-analyze, which rates the hardening of
# the systemd unit meshctl enroll installs (meshctl's unit tests), and dbus-daemon, the private
# session bus on which the agent's unit tests of --resolver resolved meet a stub systemd-resolved.
# And the container engine on lab nodes (lab.sh podman): Debian's podman (it brings conmon and
# containers-common), run as root with runc, vfs storage and the CNI bridge of
# containernetworking-plugins (so neither netavark/aardvark-dns nor the rootless helpers uidmap,
# slirp4netns and fuse-overlayfs, which --no-install-recommends leaves out, are needed), buildah
# and busybox-static for its image (above), and iptables, which the portmap CNI plugin drives
# for `podman run -p` inside a node. And for make bench-peers, which builds innernet-server from
# crates.io: it links the system's SQLite (libsqlite3-dev, found through pkg-config).
wanted=(iproute2:ip dnsutils:dig shellcheck:shellcheck openssl:openssl curl:curl util-linux:flock procps:pgrep
  wireguard-go:wireguard-go wireguard-tools:wg nftables:nft tcpdump:tcpdump socat:socat
  iperf3:iperf3 iputils-ping:ping
  openssh-client:ssh openssh-server:/usr/sbin/sshd
  containerd:containerd runc:/usr/sbin/runc containernetworking-plugins:/usr/lib/cni/bridge
  buildah:buildah gcc:gcc libc6-dev:/usr/lib/x86_64-linux-gnu/libc.a binutils:objcopy
  busybox-static:/bin/busybox python3:/usr/bin/python3
  qemu-system-x86:qemu-system-x86_64 kmod:/usr/sbin/depmod cpio:cpio e2fsprogs:/usr/sbin/mke2fs conntrack:conntrack
  systemd:systemd-analyze dbus-daemon:dbus-daemon
  podman:podman conmon:conmon iptables:/usr/sbin/iptables
  libsqlite3-dev:/usr/include/sqlite3.h pkg-config:pkg-config)
missing=()
for pair in "${wanted[@]}"; do
  what="${pair#*:}"
  if [[ "$what" == /* ]]; then [ -e "$what" ]; else command -v "$what" >/dev/null 2>&1; fi ||
    missing+=("${pair%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "missing ${missing[*]}; run as root or install them: apt-get install ${missing[*]}"; exit 1; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # openssh-server's postinst starts sshd on port 22 of the host unless policy-rc.d says no. The
  # lab runs its own sshd inside its SSH nodes only, so no package may start a service here.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\n# made by harness-mesh e2e/lab/install-deps.sh for one apt-get run\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v go >/dev/null 2>&1 || { log "Go is required to build the lab's Kubernetes binaries (go 1.26+)"; exit 1; }
command -v cargo >/dev/null 2>&1 || { log "Rust (cargo) is required"; exit 1; }
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    log "adding the Rust component $component"
    rustup component add "$component" >&2
  fi
done
