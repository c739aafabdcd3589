#!/bin/bash
# Prototype of `lab-up MODE=kubelet` (k7 names/ports): control plane + NODES kubelet nodes.
set -euo pipefail
NODES=${NODES:-2}; K7=/tmp/k7; P=$K7/pki; C=$HOME/.cache/harness-mesh; B=$C/k8s-v1.37.2
K="$B/kubectl --kubeconfig $P/admin.kubeconfig"
t0=$(date +%s.%N); ts() { printf '[%6.2fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }
mkdir -p $K7/logs $K7/run $K7/etcd; chmod 700 $K7/run $K7/etcd
# etcd, apiserver (egress selector -> CONNECT proxy in the bridge ns, for logs/exec/port-forward)
setsid $C/etcd-v3.7.3/etcd --name=k7 --data-dir=$K7/etcd --listen-client-urls=http://127.0.0.1:33790 --advertise-client-urls=http://127.0.0.1:33790 --listen-peer-urls=http://127.0.0.1:33800 --initial-advertise-peer-urls=http://127.0.0.1:33800 --initial-cluster=k7=http://127.0.0.1:33800 --initial-cluster-state=new > $K7/logs/etcd.log 2>&1 < /dev/null &
ip netns add k7-lab; ip -n k7-lab link set lo up; ip -n k7-lab link add k7-br type bridge; ip -n k7-lab link set k7-br up
ip -n k7-lab addr add 192.168.177.254/24 dev k7-br
setsid ip netns exec k7-lab python3 $K7/egress-proxy.py $K7/run/egress.sock 192.168.177.0/24 > $K7/logs/egress.log 2>&1 < /dev/null &
until curl -fsS --max-time 1 http://127.0.0.1:33790/health >/dev/null 2>&1; do sleep 0.1; done; ts "etcd healthy"
setsid $B/kube-apiserver --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none --secure-port=26443 --etcd-servers=http://127.0.0.1:33790 --tls-cert-file=$P/apiserver.crt --tls-private-key-file=$P/apiserver.key --client-ca-file=$P/ca.crt --authorization-mode=Node,RBAC --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file=$P/sa.pub --service-account-signing-key-file=$P/sa.key --api-audiences=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range=10.96.0.0/16 --allow-privileged=true --kubelet-client-certificate=$P/admin.crt --kubelet-client-key=$P/admin.key --kubelet-preferred-address-types=InternalIP --egress-selector-config-file=$K7/egress.yaml > $K7/logs/apiserver.log 2>&1 < /dev/null &
setsid socat UNIX-LISTEN:$K7/run/api.sock,fork,mode=600,unlink-early TCP:127.0.0.1:26443 > $K7/logs/relay.log 2>&1 < /dev/null &
until $K get --raw /readyz >/dev/null 2>&1; do sleep 0.2; done; ts "apiserver ready"
setsid $B/kube-controller-manager --kubeconfig=$P/kcm.kubeconfig --authentication-kubeconfig=$P/kcm.kubeconfig --authorization-kubeconfig=$P/kcm.kubeconfig --bind-address=127.0.0.1 --secure-port=30257 --service-account-private-key-file=$P/sa.key --root-ca-file=$P/ca.crt --use-service-account-credentials=true --cluster-signing-cert-file=$P/ca.crt --cluster-signing-key-file=$P/ca.key --service-cluster-ip-range=10.96.0.0/16 --leader-elect=false > $K7/logs/kcm.log 2>&1 < /dev/null &
setsid $B/kube-scheduler --kubeconfig=$P/sched.kubeconfig --authentication-kubeconfig=$P/sched.kubeconfig --authorization-kubeconfig=$P/sched.kubeconfig --bind-address=127.0.0.1 --secure-port=30259 --leader-elect=false > $K7/logs/sched.log 2>&1 < /dev/null &
for i in $(seq 1 $NODES); do
  others=$(seq 1 $NODES | grep -vx $i | tr '\n' ' ')
  OTHERS="$others" $K7/node-up.sh k7-node$i $i > $K7/logs/node-up-$i.log 2>&1
  ts "node k7-node$i started"
done
until [ "$($K get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)" = $NODES ]; do sleep 0.2; done; ts "$NODES nodes Ready"
until $K get sa default >/dev/null 2>&1; do sleep 0.2; done; ts "default ServiceAccount (kcm) present"
