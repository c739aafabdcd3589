#!/bin/bash
# usage: node-down.sh NAME DIR — stops everything of one k7 node and removes its netns and cgroups
name=$1 N=$2
cg_pids() { cat $(find /sys/fs/cgroup/pids/$name -name cgroup.procs 2>/dev/null) 2>/dev/null; }
# 1. kubelet first (so it does not restart pods), then containers, then the rest of the netns
for p in $(ip netns pids $name 2>/dev/null); do [ "$(readlink /proc/$p/exe)" = "$HOME/.cache/harness-mesh/k8s-v1.37.2/kubelet" ] && kill -TERM $p; done; sleep 0.5
p=$(cg_pids); [ -n "$p" ] && kill -9 $p
p=$(ip netns pids $name 2>/dev/null); [ -n "$p" ] && kill -TERM $p
for _ in $(seq 50); do [ -z "$(ip netns pids $name 2>/dev/null)$(cg_pids)" ] && break; sleep 0.1; done
p=$(ip netns pids $name 2>/dev/null); [ -n "$p" ] && { echo "SIGKILL left: $p"; kill -9 $p; sleep 0.3; }
# 2. cgroups, depth first
for c in /sys/fs/cgroup/*/; do [ -d $c$name ] && find $c$name -depth -type d -exec rmdir {} \; ; done
# 3. netns (its veth peer on k7-br goes with it)
ip netns del $name
ls -d /sys/fs/cgroup/*/$name 2>/dev/null && echo "cgroups left"; mount | grep -F "$N" && echo "mounts left"; true
