#!/bin/bash
# Full teardown of the k7 prototype: nodes, control plane, relays, bridge ns, state. PIDs only.
K7=/tmp/k7
exe_is() { [ "$(readlink /proc/$1/exe 2>/dev/null)" = "$2" ]; }
for d in $K7/k7-node*; do [ -d $d ] || continue
  name=$(basename $d)
  [ -e /run/netns/$name ] && $K7/node-down.sh $name $d
done
# root-namespace processes whose command line names /tmp/k7 (control plane, relays, proxy)
pids=$(for p in /proc/[0-9]*; do case "$(basename "$(readlink $p/exe 2>/dev/null)")" in etcd|kube-apiserver|kube-controller-manager|kube-scheduler|socat|python3*) tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q -- '/tmp/k7/' && echo ${p#/proc/};; esac; done)
[ -n "$pids" ] && kill -TERM $pids 2>/dev/null
for _ in $(seq 50); do alive=""; for p in $pids; do kill -0 $p 2>/dev/null && alive="$alive $p"; done; [ -z "$alive" ] && break; sleep 0.1; done
[ -n "$alive" ] && { echo "SIGKILL:$alive"; kill -9 $alive; }
ip netns del k7-lab 2>/dev/null
true
