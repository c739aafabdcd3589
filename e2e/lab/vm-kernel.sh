#!/usr/bin/env bash
# The kernel of the lab's VM nodes: Debian's cloud kernel, the version that the meta-package
# linux-image-cloud-amd64 depends on (looked up with apt-cache, never hard-coded: old builds
# leave the mirror), downloaded once with `apt-get download`, unpacked and given a modules.dep
# (the .deb has none) in $HARNESS_MESH_CACHE/vm/kernel-<version>/. Prints that directory.
#
#   e2e/lab/vm-kernel.sh            the kernel directory (downloads on first use: needs the mirror)
#   e2e/lab/vm-kernel.sh --version  the version only (no download)
#
# Run it outside `e2e/lab/ns.sh` (no network in there) before the first `up --vm-nodes K`;
# later runs find the cache and need no network. A lab without network that lacks the kernel
# fails with a message that says to run this.
set -euo pipefail

cache="${HARNESS_MESH_CACHE:-$HOME/.cache/harness-mesh}/vm"
log() { printf '[vm-kernel] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

version() {
  local v
  command -v apt-cache >/dev/null || die "apt-cache is missing: VM nodes need a Debian-like machine"
  v="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1)"
  [ -n "$v" ] || die "apt-cache knows no linux-image-cloud-amd64 (run apt-get update, outside e2e/lab/ns.sh)"
  echo "$v"
}

main() {
  local kv dir tmp deb
  kv="$(version)"
  if [ "${1:-}" = --version ]; then echo "$kv"; return 0; fi
  dir="$cache/kernel-$kv"
  if [ -f "$dir/.complete" ]; then echo "$dir"; return 0; fi
  command -v depmod >/dev/null || die "depmod is missing: run e2e/lab/install-deps.sh (kmod)"
  mkdir -p "$cache"
  tmp="$(mktemp -d "$cache/.kernel-$kv.XXXXXX")"
  kernel_tmp="$tmp"
  trap 'rm -rf "$kernel_tmp"' EXIT
  log "downloading linux-image-$kv (Debian's cloud kernel for the lab's VM nodes) into $dir"
  (cd "$tmp" && apt-get download -q "linux-image-$kv" >&2 2>/dev/null) ||
    (cd "$tmp" && apt-get download "linux-image-$kv" >&2) ||
    die "apt-get download linux-image-$kv failed (no network? run this outside e2e/lab/ns.sh; or apt-get update)"
  deb="$(ls "$tmp"/linux-image-"$kv"_*.deb)"
  dpkg-deb -x "$deb" "$tmp/root"
  depmod -b "$tmp/root" "$kv"
  [ -f "$tmp/root/boot/vmlinuz-$kv" ] || die "the package has no boot/vmlinuz-$kv"
  rm -rf "$dir"
  mv "$tmp/root" "$dir"
  : >"$dir/.complete"
  log "kernel $kv ready in $dir"
  echo "$dir"
}

main "$@"
