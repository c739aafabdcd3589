# harness-mesh: the commands people and CI use. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

NODES ?= 3
MODE ?= plain
VM_NODES ?= 0
NAT_NODES ?= 0
CARGO ?= cargo
LAB := e2e/lab/lab.sh
KUBECTL := .lab/bin/kubectl --kubeconfig .lab/kubeconfig

.PHONY: help deps bench bench-scale bench-sync build crds check-crds check-macos bench-laptop bench-peers fmt lint unit fuzz test e2e-controller e2e-resolver e2e-resolver-zone e2e-containers e2e-laptop e2e-vm e2e-nat kubelet-e2e meshctl status graph chart images kind-e2e lab-up lab-down lab-status demo

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

deps: ## install what a fresh machine lacks (Debian packages, rustfmt, clippy)
	e2e/lab/install-deps.sh

build: ## build every crate
	$(CARGO) build --workspace --all-targets

crds: ## regenerate crds/ from the mesh-api types, and the chart's copy
	$(CARGO) run -q -p mesh-api --bin crdgen -- crds
	cp crds/*.yaml charts/harness-mesh/crds/

check-crds: ## fail when crds/ or the chart's copy differs from the mesh-api types
	$(CARGO) run -q -p mesh-api --bin crdgen -- --check crds
	diff -r crds charts/harness-mesh/crds || { echo "charts/harness-mesh/crds/ differs from crds/: run make crds" >&2; exit 1; }

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## rustfmt, clippy (warnings are errors), shellcheck, actionlint (the GitHub workflows)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features harness-mesh-e2e/kubelet-lab,harness-mesh-e2e/vm-lab,harness-mesh-e2e/nat-lab -- -D warnings
	shellcheck -x -P SCRIPTDIR e2e/lab/*.sh e2e/kind/*.sh images/*.sh
	@actionlint="$$(e2e/lab/build-binaries.sh actionlint)" && echo "$$actionlint .github/workflows/*.yml" && \
	  "$$actionlint" -shellcheck "$$(command -v shellcheck)" .github/workflows/*.yml

check-macos: ## type-check meshctl (laptop mode: connect, forward, expose) for x86_64-apple-darwin; needs rustup's target and clang; not linked (no macOS SDK here)
	rustup target add x86_64-apple-darwin
	@command -v clang >/dev/null || { echo "[check-macos] needs clang (apt-get install clang)" >&2; exit 1; }
	@# ring compiles C even for a check: three headers of the macOS SDK it includes, as stubs.
	@mkdir -p target/macos-stubs
	@printf '#define TARGET_OS_OSX 1\n#define TARGET_OS_IPHONE 0\n#define TARGET_OS_MAC 1\n#define TARGET_OS_IOS 0\n' >target/macos-stubs/TargetConditionals.h
	@printf '#define assert(x) ((void)0)\n' >target/macos-stubs/assert.h
	@printf '#include <stddef.h>\nvoid *memcpy(void *, const void *, size_t);\nvoid *memset(void *, int, size_t);\nint memcmp(const void *, const void *, size_t);\nvoid *memmove(void *, const void *, size_t);\n' >target/macos-stubs/string.h
	CC_x86_64_apple_darwin=clang CFLAGS_x86_64_apple_darwin="-target x86_64-apple-darwin -ffreestanding -nostdlibinc -I$(CURDIR)/target/macos-stubs" \
	  $(CARGO) check --target x86_64-apple-darwin -p meshctl

unit: ## the fast tests, no lab: every crate's unit tests (libraries and binaries), and the pure crates' property tests
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p mesh-core -p mesh-api -p mesh-wireguard -p mesh-dataplane --tests
	$(CARGO) test -p mesh-agent --test cli
	$(CARGO) test -p mesh-netstack --tests

fuzz: ## the fuzz targets (proptest: endpoints, UAPI answers, keys, DNS) for longer: PROPTEST_CASES=N (10000)
	PROPTEST_CASES=$${PROPTEST_CASES:-10000} $(CARGO) test -p mesh-core -p mesh-wireguard -p mesh-dataplane --test fuzz
	PROPTEST_CASES=$${PROPTEST_CASES:-10000} $(CARGO) test -p mesh-agent --bin mesh-agent fuzz_

test: deps check-crds lint ## the whole suite: drift check, lints, unit, property and lab tests (3 nodes, or the running lab), then e2e-controller, e2e-resolver-zone, e2e-vm, e2e-nat and kubelet-e2e
	$(CARGO) build --workspace --bins
	@set -e; was_up=0; $(LAB) status >/dev/null 2>&1 && was_up=1; \
	  if [ $$was_up = 1 ] && { grep -q '^MODE=kubelet' .lab/config || ! grep -q '^VM_NODES=0' .lab/config || grep -q '^NAT_NODES=[1-9]' .lab/config; }; then $(LAB) down; was_up=0; fi; \
	  trap '[ $$was_up = 1 ] || $(LAB) down' EXIT; \
	  $(LAB) up --nodes 3 --mode plain; \
	  $(CARGO) test --workspace --no-fail-fast --exclude mesh-controller; \
	  $(CARGO) test -p mesh-controller --no-fail-fast --bins
	$(MAKE) e2e-controller
	$(MAKE) e2e-resolver-zone
	$(MAKE) e2e-vm
	$(MAKE) e2e-nat
	$(MAKE) kubelet-e2e

e2e-controller: deps ## the controller suite (controller/tests/lab.rs) on a lab of its own with no nodes: its controller acts on every object; takes the lab down
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	e2e/lab/build-binaries.sh kube-controller-manager >/dev/null
	@set -e; $(LAB) down; trap '$(LAB) down' EXIT; \
	  $(LAB) up --nodes 0 --mode plain; \
	  $(CARGO) test -p mesh-controller --no-fail-fast --test lab

# The mixed mesh: 2 namespace nodes (wireguard-go) and 1 VM node (the kernel's WireGuard), the
# suites run on hm-node-1, hm-vm-1, hm-node-2 (the VM hosts the service and is restarted).
VM_SUITE_ENV := HARNESS_MESH_NODES=hm-node-1,hm-vm-1,hm-node-2 \
  HARNESS_MESH_NODE_EXEC="$(CURDIR)/e2e/lab/lab.sh exec {node} --" \
  HARNESS_MESH_AGENT_RESTART="$(CURDIR)/e2e/lab/lab.sh agent restart {node}" \
  HARNESS_MESH_STATE_DIR="$(CURDIR)/.lab/nodes/{node}" MESH_REQUIRE_KERNEL_WG=1

e2e-resolver: deps ## names for native processes (e2e/tests/resolver.rs): getent and curl by name on the nodes (agents in --resolver hosts, each node its own /etc/hosts) and on a machine enrolled with --resolver hosts, on the running lab or a new 3-node one (kept up); make test runs it in its plain tier
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	$(LAB) up --nodes 3 --mode plain
	$(CARGO) test -p harness-mesh-e2e --no-fail-fast --test resolver -- --nocapture

e2e-containers: deps ## containers as backends (e2e/tests/containers.rs): Podman on a lab node, services by container, on the running lab or a new 3-node one (kept up); make test runs it in its plain tier
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	$(LAB) up --nodes 3 --mode plain
	$(CARGO) test -p harness-mesh-e2e --no-fail-fast --test containers -- --nocapture

e2e-resolver-zone: deps ## the resolver suite under another zone: a lab of its own whose controller, agents and enroll use mesh.internal (HM_LAB_ZONE); takes the lab down
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	$(CARGO) test -p harness-mesh-e2e --test resolver --no-run
	@set -e; $(LAB) down; trap '$(LAB) down' EXIT; \
	  HM_LAB_ZONE=mesh.internal $(LAB) up --nodes 3 --mode plain; \
	  grep -qx 'ZONE=mesh.internal' .lab/config || { echo "[e2e-resolver-zone] the lab did not take the zone" >&2; exit 1; }; \
	  $(CARGO) test -p harness-mesh-e2e --no-fail-fast --test resolver -- --nocapture

e2e-laptop: deps ## laptop mode (e2e/tests/laptop.rs): meshctl connect/forward/expose as an unprivileged uid with no tun, on the running lab or a new 3-node one (kept up)
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	$(LAB) up --nodes 3 --mode plain
	$(CARGO) test -p harness-mesh-e2e --no-fail-fast --test laptop -- --nocapture

e2e-vm: deps ## the mixed mesh: lab with 2 namespace nodes + 1 VM node (kernel WireGuard); mesh, discovery and vm suites; takes the lab down
	$(CARGO) build --workspace --bins
	e2e/lab/vm-kernel.sh >/dev/null
	@set -e; \
	  tests="$$($(CARGO) test -p mesh-agent --bin mesh-agent --no-run 2>&1 | sed -n 's|.*Executable unittests src/main.rs (\(.*\))$$|\1|p')"; \
	  [ -n "$$tests" ] || { echo "[e2e-vm] cargo named no mesh-agent test binary" >&2; exit 1; }; \
	  start=$$SECONDS; $(LAB) down; trap '$(LAB) down; echo "[e2e-vm] took $$((SECONDS - start)) s"' EXIT; \
	  $(LAB) up --nodes 2 --vm-nodes 1; \
	  MESH_AGENT_TEST_BINARY="$(CURDIR)/$$tests" $(VM_SUITE_ENV) $(CARGO) test -p harness-mesh-e2e --features vm-lab --no-fail-fast --test vm --test mesh --test discovery

# Nodes behind NAT: 2 open namespace nodes (hm-node-1 the mesh relay) and 2 behind a NAT router
# each (e2e/lab/nat.sh).
NAT_SUITE_ENV := HARNESS_MESH_NODES=hm-node-1,hm-node-2,hm-nat-1,hm-nat-2 \
  HARNESS_MESH_NODE_EXEC="$(CURDIR)/e2e/lab/lab.sh exec {node} --" \
  HARNESS_MESH_AGENT_RESTART="$(CURDIR)/e2e/lab/lab.sh agent restart {node}" \
  HARNESS_MESH_STATE_DIR="$(CURDIR)/.lab/nodes/{node}"

e2e-nat: deps ## nodes behind NAT: lab with 2 open nodes (one the relay) + 2 NATed nodes (nftables masquerade); the nat suite (join, service, learned endpoints, conntrack flush, relay between two NATs, moving NATs, no plaintext); takes the lab down
	$(CARGO) build -p mesh-controller -p mesh-agent -p meshctl
	$(CARGO) test -p harness-mesh-e2e --features nat-lab --test nat --no-run
	@set -e; start=$$SECONDS; $(LAB) down; trap '$(LAB) down; echo "[e2e-nat] took $$((SECONDS - start)) s"' EXIT; \
	  $(LAB) up --nodes 2 --nat-nodes 2; \
	  $(NAT_SUITE_ENV) $(CARGO) test -p harness-mesh-e2e --features nat-lab --no-fail-fast --test nat -- --nocapture

kubelet-e2e: deps ## the chart as real pods: lab in kubelet mode (3 nodes), kubelet + cluster_services + mesh + discovery + meshctl + enroll suites, the pod-network attacks, then uninstall (helm uninstall leaves nothing); takes the lab down
	$(CARGO) build --workspace --bins
	@set -e; $(LAB) down; trap '$(LAB) down' EXIT; \
	  $(LAB) up --mode kubelet --nodes 3; \
	  $(CARGO) test -p harness-mesh-e2e --features kubelet-lab --no-fail-fast --test kubelet --test cluster_services --test mesh --test discovery --test meshctl --test enroll; \
  $(CARGO) test -p harness-mesh-e2e --features kubelet-lab --no-fail-fast --test attacks -- pod_network:: listeners::; \
	  $(CARGO) test -p harness-mesh-e2e --features kubelet-lab --no-fail-fast --test uninstall

bench: deps ## benchmarks (3-node lab, then 500 simulated nodes): one table at the end, JSON under target/bench/
	$(CARGO) build --workspace --bins
	$(CARGO) build --release -p mesh-agent
	$(LAB) up --nodes 3
	$(CARGO) bench -p mesh-controller --bench allocation
	$(CARGO) bench -p harness-mesh-e2e --bench mesh
	$(MAKE) bench-laptop
	$(CARGO) bench -p mesh-controller --bench scale
	$(MAKE) bench-sync
	$(CARGO) run -q -p harness-mesh-e2e --bin bench-report

bench-laptop: deps ## laptop mode: release meshctl forward (unprivileged, no tun) next to the agents' wireguard-go, one run: target/bench/laptop.json
	$(CARGO) build -q --release -p meshctl
	$(CARGO) build -q -p mesh-controller -p mesh-agent
	$(LAB) up --nodes 3
	$(CARGO) bench -p harness-mesh-e2e --bench laptop

# The peers bench-peers measures against, pinned and cached like the Go binaries (cargo install
# into the cache, then a copy under target/ that the lab's unprivileged laptop user can run).
ONETUN_VERSION := 0.3.10
ONETUN_ROOT := $(HOME)/.cache/harness-mesh/peers/onetun-$(ONETUN_VERSION)
INNERNET_VERSION := 2.0.0
INNERNET_ROOT := $(HOME)/.cache/harness-mesh/peers/innernet-$(INNERNET_VERSION)
bench-peers: deps ## side by side with peers, one lab run: meshctl forward against onetun $(ONETUN_VERSION); the mesh against innernet $(INNERNET_VERSION) at 3 and 20 nodes (PEERS_SIZES): joins, removals, names, idle cost, RTT, iperf3; target/bench/peers.json
	@test -x $(ONETUN_ROOT)/bin/onetun || $(CARGO) install --locked --version $(ONETUN_VERSION) --root $(ONETUN_ROOT) onetun
	@test -x $(INNERNET_ROOT)/bin/innernet || $(CARGO) install --locked --version $(INNERNET_VERSION) --root $(INNERNET_ROOT) innernet
	@test -x $(INNERNET_ROOT)/bin/innernet-server || $(CARGO) install --locked --version $(INNERNET_VERSION) --root $(INNERNET_ROOT) innernet-server
	mkdir -p target/peers && cp $(ONETUN_ROOT)/bin/onetun target/peers/onetun
	$(CARGO) build -q --release -p meshctl -p mesh-agent
	$(CARGO) build -q -p mesh-controller -p mesh-agent
	$(LAB) up --nodes 3
	HM_AGENT_BIN=$(CURDIR)/target/release/mesh-agent ONETUN=$(CURDIR)/target/peers/onetun INNERNET_BIN=$(INNERNET_ROOT)/bin $(CARGO) bench -p harness-mesh-e2e --bench peers

SCALE_SIZES ?= 500 2000 5000
bench-sync: ## one agent's sync in CPU at 5,000 MeshNodes / 50,000 MeshServices, no lab (directory, plan, DNS update): target/bench/sync.json
	$(CARGO) run -q --release -p mesh-agent --example sync_scale

bench-scale: deps ## the scale bench at several sizes (SCALE_SIZES, MeshNodes; 10 MeshServices each): target/bench/scale-N.json, table at the end
	$(CARGO) build --workspace --bins
	$(CARGO) build --release -p mesh-agent
	$(LAB) up --nodes 3
	@set -e; for n in $(SCALE_SIZES); do \
	  echo "[bench-scale] $$n MeshNodes, $$((n * 10)) MeshServices"; \
	  HM_BENCH_NODES=$$n HM_BENCH_SERVICES=$$((n * 10)) HM_BENCH_OUT=scale-$$n.json $(CARGO) bench -p mesh-controller --bench scale; \
	done
	$(CARGO) run -q -p harness-mesh-e2e --bin bench-report -- --scale $(SCALE_SIZES)

meshctl: ## build meshctl, with the kubectl plugin link kubectl-mesh beside it
	$(CARGO) build -q -p meshctl
	ln -sf meshctl target/debug/kubectl-mesh

status: meshctl ## meshctl status on the lab
	target/debug/meshctl --kubeconfig .lab/kubeconfig status

graph: meshctl ## the lab's topology as target/mesh.svg
	target/debug/meshctl --kubeconfig .lab/kubeconfig graph > target/mesh.svg
	@echo wrote target/mesh.svg

chart: ## the Helm chart's tests on the lab: lint, dry run, install/upgrade/uninstall, RBAC proofs
	$(CARGO) test -p harness-mesh-e2e --test chart

images: ## build the controller and agent images (docker, podman or buildah; pulls rust and alpine): REGISTRY=, TAG=
	images/build.sh

kind-e2e: ## the e2e suite on a kind cluster (needs Docker, kind, kubectl, helm)
	e2e/kind/run.sh

lab-up: deps ## start the lab (idempotent) with mesh-controller and N agents: NODES=N (3), MODE=plain|kubelet, VM_NODES=K (0), NAT_NODES=K (0)
	@[ -x target/debug/mesh-agent ] || echo "[make] building mesh-controller, mesh-agent and meshctl into target/debug (cargo; the first build on 2 cores takes about 3 min, later ones seconds)"
	$(CARGO) build -q -p mesh-controller -p mesh-agent -p meshctl
	@if [ "$(VM_NODES)" != 0 ]; then $(CARGO) build -q -p harness-mesh-e2e --bin lab-vm-exec && e2e/lab/vm-kernel.sh >/dev/null; fi
	$(LAB) up --nodes $(NODES) --mode $(MODE) --vm-nodes $(VM_NODES) --nat-nodes $(NAT_NODES)

lab-down: ## stop the lab; leaves no process and no hm-* namespace
	$(LAB) down

lab-status: ## show what of the lab is running
	$(LAB) status

demo: lab-up ## the main job: lab with 3 nodes, a service on node 2 reached over the mesh from the others
	e2e/lab/demo.sh
