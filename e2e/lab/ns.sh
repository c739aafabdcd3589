#!/usr/bin/env bash
# Runs a command in a private, named network + mount namespace, so two labs (two clones of the
# repository, say a working tree and a CI clone) run side by side on one machine without seeing
# each other's hm-* namespaces, loopback ports or /run/wireguard sockets.
#
#   e2e/lab/ns.sh NAME CMD [ARG...]   run CMD inside NAME (made on first use), e.g.
#                                     e2e/lab/ns.sh ci make demo; e2e/lab/ns.sh ci make test
#   e2e/lab/ns.sh NAME                an interactive shell inside NAME
#   e2e/lab/ns.sh --delete NAME       remove NAME (refused while processes still run in it)
#   e2e/lab/ns.sh --list              the namespaces made here, and how many processes each has
#
# See "Two labs on one machine" in e2e/lab/README.md. Root only.
set -euo pipefail

root="${HM_NS_ROOT:-/run/harness-mesh-ns}"
log() { printf '[ns] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat <<EOF
Usage: e2e/lab/ns.sh NAME [CMD [ARG...]]
       e2e/lab/ns.sh --delete NAME
       e2e/lab/ns.sh --list

Runs CMD (default: \$SHELL) in the private lab namespace NAME, made on first use and kept until
--delete: a network namespace of its own, where only the loopback interface exists (so the
lab's 127.0.0.1 ports and its hm-* node namespaces cannot collide with another lab's), and a
mount namespace of its own with private tmpfs on /run/netns, /run/wireguard and /etc/netns
(where the lab keeps each node's /etc/hosts). Files, the
repository and the caches (~/.cache/harness-mesh, cargo's and Go's) are shared with the host.

Inside NAME there is no network at all beyond loopback: fetch what needs the package registries
first, outside it, e.g.
  make deps && cargo fetch && e2e/lab/build-binaries.sh etcd kube-apiserver kubectl helm

Every later call with the same NAME enters the same namespaces, so a lab started by
'e2e/lab/ns.sh ci make demo' is seen by 'e2e/lab/ns.sh ci make test'. Stop the lab inside
('e2e/lab/ns.sh ci make lab-down') before '--delete ci'.

Namespaces live under $root (\$HM_NS_ROOT). Inside, \$HM_NS is NAME.
EOF
}

valid_name() { [[ "$1" =~ ^[a-z0-9][a-z0-9-]{0,31}$ ]]; }

# The inode of a persistent namespace file, as /proc/PID/ns/* names it: net:[INODE].
ns_inode() { stat -L -c %i "$1"; }

# Pids whose network namespace is NAME's.
members() {
  local inode pid
  inode="$(ns_inode "$root/$1/net")"
  for pid in /proc/[0-9]*; do
    [ "$(readlink "$pid/ns/net" 2>/dev/null)" = "net:[$inode]" ] && echo "${pid#/proc/}"
  done
  return 0
}

exists() { [ -f "$root/$1/net" ] && mountpoint -q "$root/$1/net" && mountpoint -q "$root/$1/mnt"; }

create() {
  local name="$1" dir="$root/$1"
  mkdir -p "$root"
  # unshare(1) can pin a mount namespace only on a mount with private propagation.
  mountpoint -q "$root" || mount --bind "$root" "$root"
  mount --make-private "$root"
  mkdir -p "$dir"
  : >"$dir/net"
  : >"$dir/mnt"
  # The mount points must exist before the private mounts go on them; empty directories on the
  # host's /run are harmless (lab.sh would make /run/wireguard itself).
  mkdir -p /run/netns
  [ -d /run/wireguard ] || mkdir -m 0700 /run/wireguard
  # lab.sh gives each node its own /etc/hosts as /etc/netns/NODE/hosts, which `ip netns exec`
  # bind-mounts on /etc/hosts: private here too, so that two labs' hm-node-1 never share one (an
  # empty /etc/netns made here goes with the last namespace).
  if [ ! -d /etc/netns ]; then mkdir -m 0755 /etc/netns && : >"$root/made-etc-netns"; fi
  unshare --net="$dir/net" --mount="$dir/mnt" --propagation private -- sh -ec '
    mount -t tmpfs -o mode=0755,size=1m hm-ns-netns /run/netns
    mount -t tmpfs -o mode=0700,size=16m hm-ns-wireguard /run/wireguard
    mount -t tmpfs -o mode=0755,size=1m hm-ns-etc-netns /etc/netns
    ip link set lo up
  ' || { umount "$dir/net" "$dir/mnt" 2>/dev/null || true; rm -rf "$dir"; die "could not make namespace $name"; }
  log "made namespace $name (network: loopback only; own /run/netns, /run/wireguard and /etc/netns)"
}

# True when another namespace here has its private /etc/netns mounted.
etc_netns_in_use() {
  local dir
  for dir in "$root"/*/; do
    [ -f "$dir/mnt" ] || continue
    nsenter --mount="$dir/mnt" findmnt -n /etc/netns >/dev/null 2>&1 && return 0
  done
  return 1
}

delete() {
  local name="$1" dir="$root/$1" left
  [ -d "$dir" ] || { log "no namespace $name"; return 0; }
  if exists "$name"; then
    left="$(members "$name" | tr '\n' ' ')"
    [ -z "$left" ] || die "processes still run in $name (pids $left); stop them first, e.g. e2e/lab/ns.sh $name make lab-down"
  fi
  umount "$dir/net" 2>/dev/null || true
  umount "$dir/mnt" 2>/dev/null || true
  rm -rf "$dir"
  # The empty /etc/netns made as a mount point goes once no other namespace mounts on it (one
  # made by an older ns.sh, which does not, does not keep it).
  if [ -f "$root/made-etc-netns" ] && ! etc_netns_in_use; then
    rmdir /etc/netns 2>/dev/null && rm -f "$root/made-etc-netns"
  fi
  log "deleted namespace $name"
}

list() {
  local dir name
  [ -d "$root" ] || return 0
  for dir in "$root"/*/; do
    [ -d "$dir" ] || continue
    name="$(basename "$dir")"
    if exists "$name"; then
      printf '%s\t%s processes\n' "$name" "$(members "$name" | wc -l)"
    else
      printf '%s\tbroken (delete it)\n' "$name"
    fi
  done
}

case "${1:-}" in
  "" | -h | --help | help) usage; exit 0 ;;
  --list) list; exit 0 ;;
  --delete)
    [ $# -eq 2 ] || die "usage: e2e/lab/ns.sh --delete NAME"
    valid_name "$2" || die "invalid namespace name '$2'"
    [ "$(id -u)" = 0 ] || die "run as root (namespaces need CAP_SYS_ADMIN)"
    delete "$2"; exit 0 ;;
esac

name="$1"
shift
valid_name "$name" || die "invalid namespace name '$name': lower-case letters, digits and '-', at most 32"
[ "$(id -u)" = 0 ] || die "run as root (namespaces need CAP_SYS_ADMIN)"
for tool in unshare nsenter mountpoint ip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (util-linux, iproute2)"
done
exists "$name" || { [ ! -d "$root/$name" ] || delete "$name"; create "$name"; }
[ $# -gt 0 ] || set -- "${SHELL:-/bin/bash}"
HM_NS="$name" exec nsenter --net="$root/$name/net" --mount="$root/$name/mnt" --wd="$PWD" -- "$@"
