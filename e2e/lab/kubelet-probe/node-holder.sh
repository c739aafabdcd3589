#!/bin/sh
# Runs inside: nsenter --net=/run/netns/k7-node unshare -m --propagation private
# Gives the node a netns-correct /sys, the cgroup hierarchies back, and a private /var overlay.
set -e
N=/tmp/k7/node
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir -p /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mkdir -p $N/var-upper $N/var-work
mount -t overlay overlay -o lowerdir=/var,upperdir=$N/var-upper,workdir=$N/var-work /var
# hostPath /run/* and /var/run/* (e.g. the chart's /var/run/wireguard) stay per node
mount -t tmpfs -o mode=755 k7-run /run
mkdir -p /run/lock /run/netns
echo $$ > $N/holder.pid
exec sleep infinity
