#!/bin/bash
# usage: mkimage.sh REF OUT.tar ENTRYPOINT BIN...  — a from-scratch image with BINs and their ldd closure
set -euo pipefail
ref=$1 out=$2 entry=$3; shift 3
root=$(mktemp -d /tmp/k7/imgroot.XXXX)
for b in "$@"; do
  src=${b%%=*} dst=${b#*=}; [ "$src" = "$b" ] && dst=/usr/local/bin/$(basename $src)
  install -D -m 755 "$src" "$root$dst"
  ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do [ -e "$lib" ] && install -D -m 755 "$(readlink -f $lib)" "$root$lib"; done || true
done
mkdir -p "$root/tmp" "$root/run" "$root/etc"; chmod 1777 "$root/tmp"
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$root/etc/passwd"; echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
B="buildah --root /tmp/k7/buildah/root --runroot /tmp/k7/buildah/run --storage-driver vfs"
c=$($B from scratch); $B copy $c "$root/" / >/dev/null
$B config --entrypoint "[\"$entry\"]" --env PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin $c
$B commit -q --format docker $c $ref >/dev/null; rm -f "$out"; $B push -q $ref docker-archive:$out:$ref; $B rm $c >/dev/null; rm -rf "$root"
ls -la "$out"
