//! What one agent's sync costs in CPU at a given directory size, without the kernel:
//! `cargo run --release -p mesh-agent --example sync_scale -- [nodes] [services]` (default 5,000
//! MeshNodes and 50,000 MeshServices; `make bench-sync`, part of `make bench`). Prints, best of
//! 5, and writes to target/bench/sync.json:
//! - *directory afresh*: deriving the shared [`Directory`] from the objects (an agent's first
//!   sync; what every sync did before the directory was kept across syncs);
//! - *directory after one change*: bringing the kept directory to the objects after one
//!   service's IP and one node's endpoint changed, given only those two as the agent's watches
//!   report them (what a sync does in the steady state);
//! - *plan*: one node's plan from it;
//! - *DNS, every name*: the agent's DNS server given the whole zone the first time (a new
//!   server, or what every sync cost before the server applied only what differs);
//! - *DNS, one change*: the same server given the zone again after one service's IP changed
//!   (the steady state: a sync after one change);
//! - *sync after one change*: the three of a steady-state sync together (directory after one
//!   change, plan, DNS update);
//! - *device*: the diff against the device state the agent keeps between resyncs, and what a
//!   sync that reads the device back costs the agent instead (wireguard-go's answer with every
//!   peer parsed, then diffed);
//! - *hosts block*: every name rendered and spliced into a hosts file's text (`--resolver
//!   hosts`, whenever a name changes);
//! - *plan with no peer reached directly*: one node's plan when none of its peers answers a
//!   handshake (every one relayed or, without a relay, stranded), as for the scale bench's real
//!   agent, whose peers are simulated.
//!
//! And the heap each part holds (live bytes, counted by this example's allocator), written as
//! `heap_mib`: the MeshNode objects (`objects`: the agent keeps them in a store), the MeshService
//! objects (`service_objects`: the agent applies each to its directory and drops it, so this is
//! only what a full list holds while it arrives), the kept directory, and the DNS server with
//! every name.
//!
//! Not included: the round trip to the device and writing the peers that changed (wireguard-go's
//! UAPI or netlink), the hosts file's I/O, nft, and the status writes, which the scale bench
//! (`make bench-scale`) measures on a real agent.

use std::time::{Duration, Instant};

use mesh_agent::dns::DnsServer;
use mesh_api::{
    Backend, MeshNode, MeshNodeSpec, MeshNodeStatus, MeshService, MeshServiceSpec, MeshServiceStatus, NetworkSpec,
    NetworkType, PeerEntry,
};
use mesh_dataplane::dns::ShortNames;
use mesh_plan::{Directory, NodeInput, NodeSettings, Updated, convert};
use mesh_wireguard::PrivateKey;

/// The system allocator, counting the bytes live: what each part of the agent holds.
#[global_allocator]
static ALLOCATOR: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// The heap live now, in MiB.
fn live_mib() -> f64 {
    let stats = ALLOCATOR.stats();
    (stats.bytes_allocated as f64 - stats.bytes_deallocated as f64 + stats.bytes_reallocated as f64) / (1024.0 * 1024.0)
}

fn ip(i: usize, base: u8) -> String {
    format!("10.{}.{}.{}", 42 + base, (i >> 8) & 0xff, i & 0xff)
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("a count"));
    let (nodes, services) = (args.next().unwrap_or(5_000), args.next().unwrap_or(50_000));
    let keys: Vec<PrivateKey> = (0..nodes)
        .map(|i| {
            let mut bytes = [7u8; 32];
            bytes[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            PrivateKey::from_bytes(bytes)
        })
        .collect();
    let heap_start = live_mib();
    let mut mesh_nodes: Vec<MeshNode> = (0..nodes)
        .map(|i| {
            let mut node = MeshNode::new(&format!("node-{i}"), MeshNodeSpec::default());
            let public = keys[i].public_key().to_base64();
            let endpoint = format!("192.168.{}.{}:51820", (i >> 8) & 0xff, i & 0xff);
            let mut allowed = vec![format!("{}/32", ip(i, 0))];
            allowed.extend((0..services / nodes.max(1)).map(|k| format!("{}/32", ip(i * 16 + k, 1))));
            node.status = Some(MeshNodeStatus {
                mesh_ip: Some(ip(i, 0)),
                public_key: Some(public.clone()),
                endpoint: Some(endpoint.clone()),
                backend: Some(Backend::Userspace),
                peer: Some(PeerEntry {
                    public_key: public,
                    endpoint: Some(endpoint),
                    allowed_ips: allowed,
                    persistent_keepalive: None,
                }),
                ..MeshNodeStatus::default()
            });
            node.metadata.resource_version = Some("1".to_owned());
            node
        })
        .collect();
    let heap_nodes = live_mib() - heap_start;
    let heap_start = live_mib();
    let mut mesh_services: Vec<MeshService> = (0..services)
        .map(|i| {
            let node = format!("node-{}", i % nodes.max(1));
            let mut s = MeshService::new(
                &format!("svc-{i}"),
                MeshServiceSpec {
                    network: NetworkSpec { type_: NetworkType::Mesh, ports: vec![80], target_ports: Vec::new() },
                    selector: None,
                    node: Some(node.clone()),
                    container: None,
                    mesh_ip: None,
                },
            );
            s.metadata.namespace = Some(format!("ns-{}", i % 50));
            s.status =
                Some(MeshServiceStatus { mesh_ip: Some(ip(i, 1)), node: Some(node), ..MeshServiceStatus::default() });
            s.metadata.resource_version = Some("1".to_owned());
            s
        })
        .collect();
    let heap_services = live_mib() - heap_start;
    let settings = NodeSettings::defaults("10.0.0.0/8".parse().expect("a subnet"));
    let (no_peers, no_containers) = (std::collections::BTreeSet::new(), std::collections::BTreeMap::new());
    // node-1 plans: the one node whose sync is measured.
    let input = NodeInput {
        name: "node-1",
        key: &keys[1],
        settings: &settings,
        fallback: false,
        underlay: None,
        masquerade_underlay: None,
        without_direct: &no_peers,
        containers: &no_containers,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let loopback = ["127.0.0.1:0".parse().expect("an address")];
    let (mut build, mut plan, mut dns_all, mut dns_one) = (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    for round in 0..5 {
        let started = Instant::now();
        let directory = Directory::build(
            &mesh_nodes,
            &mesh_services,
            Some(settings.subnet),
            &ShortNames::default(),
            convert::literal_endpoint,
        );
        build = build.min(started.elapsed());
        let started = Instant::now();
        let node_plan = directory.plan(&input).expect("node-1 is in the directory");
        plan = plan.min(started.elapsed());
        assert_eq!(node_plan.device.peers.len(), nodes - 1);

        let server = runtime.block_on(DnsServer::start(&loopback, "mesh.local")).expect("a DNS server on loopback");
        let started = Instant::now();
        let updated = server.update(&directory.zone().records);
        dns_all = dns_all.min(started.elapsed());
        assert_eq!(updated.changed, directory.zone().records.len(), "{:?}", updated.rejected);
        // One service moves to another IP: one name differs.
        let mut records = directory.zone().records.clone();
        let (_, ips) = records.iter_mut().find(|(name, _)| name.starts_with("svc-")).expect("a service's name");
        *ips = vec![std::net::Ipv4Addr::new(10, 44, 255, round)];
        let started = Instant::now();
        let updated = server.update(&records);
        dns_one = dns_one.min(started.elapsed());
        assert_eq!(updated.changed, 1);
        runtime.block_on(server.shutdown()).expect("the DNS server stops");
    }

    // The steady state: the directory kept across syncs, one service's IP and one node's
    // endpoint changed before each sync, as the reflector stores would hold them.
    let heap_before_kept = live_mib();
    let mut kept = Directory::build(
        &mesh_nodes,
        &mesh_services,
        Some(settings.subnet),
        &ShortNames::default(),
        convert::literal_endpoint,
    );
    let server = runtime.block_on(DnsServer::start(&loopback, "mesh.local")).expect("a DNS server on loopback");
    let heap_directory = live_mib() - heap_before_kept;
    let heap_before_dns = live_mib();
    server.update(&kept.zone().records);
    let heap_dns = live_mib() - heap_before_dns;
    let (mut kept_one, mut sync_one) = (Duration::MAX, Duration::MAX);
    for round in 0..5u8 {
        let version = Some(format!("{}", u32::from(round) + 2));
        let service = &mut mesh_services[(usize::from(round) * 7_919) % services.max(1)];
        service.status.as_mut().expect("a status").mesh_ip = Some(format!("10.45.255.{round}"));
        service.metadata.resource_version.clone_from(&version);
        let node = &mut mesh_nodes[(usize::from(round) * 101 + 2) % nodes];
        let endpoint = format!("192.168.255.{round}:51820");
        let status = node.status.as_mut().expect("a status");
        status.endpoint = Some(endpoint.clone());
        status.peer.as_mut().expect("a peer entry").endpoint = Some(endpoint);
        node.metadata.resource_version = version;

        // What the agent does: only the objects its watches reported written are read.
        let service_at = (usize::from(round) * 7_919) % services.max(1);
        let node_at = (usize::from(round) * 101 + 2) % nodes;
        let service = &mesh_services[service_at];
        let written_service = (
            service.metadata.namespace.as_deref().expect("a namespace"),
            service.metadata.name.as_deref().expect("a name"),
            Some(service),
        );
        let written_node = (mesh_nodes[node_at].metadata.name.as_deref().expect("a name"), Some(&mesh_nodes[node_at]));
        let started = Instant::now();
        let updated = kept.update_changed([written_node], [written_service], convert::literal_endpoint);
        kept_one = kept_one.min(started.elapsed());
        assert_eq!(updated, Updated { nodes: 1, services: 1 });
        let node_plan = kept.plan(&input).expect("node-1 is in the directory");
        assert_eq!(node_plan.device.peers.len(), nodes - 1);
        let dns = server.update(&kept.zone().records);
        sync_one = sync_one.min(started.elapsed());
        assert_eq!(dns.changed, 1, "the service's name");
    }
    runtime.block_on(server.shutdown()).expect("the DNS server stops");

    // The device: wireguard-go's answer with every peer, parsed and diffed against the plan (what
    // a sync that reads the device back costs the agent), and the diff alone against the state
    // the agent keeps from its last read and writes. The hosts block: rendered from every name
    // and spliced into a hosts file that has the previous one.
    let node_plan = kept.plan(&input).expect("node-1 is in the directory");
    let answer = uapi_answer(&node_plan.device);
    let kept_state = mesh_wireguard::uapi::parse_get(&answer).expect("the answer parses");
    let hosts_text = format!("127.0.0.1\tlocalhost\n{}", mesh_dataplane::hosts::render(&kept.zone().records));
    // A node that reaches no peer directly (nothing answers its handshakes: every peer is
    // relayed or, with no relay, stranded), as the scale bench's real agent among simulated ones.
    let everyone: std::collections::BTreeSet<String> = node_plan.names.values().cloned().collect();
    let stranded_input = NodeInput { without_direct: &everyone, ..input };
    let (mut read_diff, mut diff_only, mut hosts_block, mut plan_stranded) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        let started = Instant::now();
        let stranded = kept.plan(&stranded_input).expect("node-1 is in the directory");
        plan_stranded = plan_stranded.min(started.elapsed());
        assert_eq!(stranded.paths.stranded.len(), nodes - 1, "no relay: every peer stranded");
        let started = Instant::now();
        let state = mesh_wireguard::uapi::parse_get(&answer).expect("the answer parses");
        let diff = mesh_wireguard::plan(&state, &node_plan.device);
        read_diff = read_diff.min(started.elapsed());
        assert!(diff.is_empty(), "the device has every peer: {} to change", diff.peers_touched());
        let started = Instant::now();
        let diff = mesh_wireguard::plan(&kept_state, &node_plan.device);
        diff_only = diff_only.min(started.elapsed());
        assert!(diff.is_empty());
        let started = Instant::now();
        let block = mesh_dataplane::hosts::render(&kept.zone().records);
        let spliced = mesh_dataplane::hosts::splice(&hosts_text, &block);
        hosts_block = hosts_block.min(started.elapsed());
        assert_eq!(spliced, hosts_text, "the same names: the same file");
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = serde_json::json!({
        "nodes": nodes,
        "services": services,
        "directory_ms": ms(build),
        "directory_one_change_ms": ms(kept_one),
        "sync_one_change_ms": ms(sync_one),
        "plan_ms": ms(plan),
        "dns_every_name_ms": ms(dns_all),
        "dns_one_change_ms": ms(dns_one),
        "device_read_and_diff_ms": ms(read_diff),
        "device_diff_ms": ms(diff_only),
        "hosts_block_ms": ms(hosts_block),
        "plan_without_direct_ms": ms(plan_stranded),
        "heap_mib": {
            "objects": heap_nodes,
            "service_objects": heap_services,
            "directory": heap_directory,
            "dns_server": heap_dns,
        },
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    if let Err(err) =
        std::fs::create_dir_all(&out).and_then(|()| std::fs::write(out.join("sync.json"), report.to_string()))
    {
        eprintln!(
            "sync_scale: could not write {}/sync.json ({err}); bench-report will leave its rows out",
            out.display()
        );
    }
    println!(
        "{nodes} MeshNodes, {services} MeshServices, best of 5: directory {:.1} ms, directory after one change \
         {:.1} ms, plan {:.1} ms, DNS every name {:.1} ms, DNS one change {:.1} ms, sync after one change {:.1} ms",
        ms(build),
        ms(kept_one),
        ms(plan),
        ms(dns_all),
        ms(dns_one),
        ms(sync_one)
    );
    println!(
        "device read back and diff {:.1} ms, diff against the kept state {:.1} ms, hosts block rendered and \
         spliced {:.1} ms, plan with no peer reached directly {:.1} ms",
        ms(read_diff),
        ms(diff_only),
        ms(hosts_block),
        ms(plan_stranded)
    );
    println!(
        "heap held: the MeshNodes (stored) {heap_nodes:.1} MiB, the kept directory {heap_directory:.1} MiB, the DNS \
         server {heap_dns:.1} MiB; the MeshServices as objects (not stored: applied and dropped) {heap_services:.1} MiB"
    );
}

/// What wireguard-go answers to a get with the device `config` on it, every peer with a
/// handshake and traffic.
fn uapi_answer(config: &mesh_wireguard::DeviceConfig) -> String {
    let empty = mesh_wireguard::DeviceState::default();
    let mut device = mesh_wireguard::device::applied(&empty, &mesh_wireguard::plan(&empty, config));
    for peer in device.peers.values_mut() {
        peer.last_handshake = Some(std::time::UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        (peer.rx_bytes, peer.tx_bytes) = (654_321, 123_456);
    }
    mesh_wireguard::uapi::render_get(&device)
}
