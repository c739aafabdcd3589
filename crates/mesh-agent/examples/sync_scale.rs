//! How long one agent's plan takes at a given directory size:
//! `cargo run --release -p mesh-plan --example plan_scale -- [nodes] [services]` (default 5,000
//! MeshNodes and 50,000 MeshServices). Prints the time to derive the shared [`Directory`] and
//! one node's plan, best of 5.

use std::time::{Duration, Instant};

use mesh_api::{
    Backend, MeshNode, MeshNodeSpec, MeshNodeStatus, MeshService, MeshServiceSpec, MeshServiceStatus, NetworkSpec,
    NetworkType, PeerEntry,
};
use mesh_dataplane::dns::ShortNames;
use mesh_plan::{Directory, NodeInput, NodeSettings, convert};
use mesh_wireguard::PrivateKey;

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
    let mesh_nodes: Vec<MeshNode> = (0..nodes)
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
            node
        })
        .collect();
    let mesh_services: Vec<MeshService> = (0..services)
        .map(|i| {
            let node = format!("node-{}", i % nodes.max(1));
            let mut s = MeshService::new(
                &format!("svc-{i}"),
                MeshServiceSpec {
                    network: NetworkSpec { type_: NetworkType::Mesh, ports: vec![80], target_ports: Vec::new() },
                    selector: None,
                    node: Some(node.clone()),
                    mesh_ip: None,
                },
            );
            s.metadata.namespace = Some(format!("ns-{}", i % 50));
            s.status =
                Some(MeshServiceStatus { mesh_ip: Some(ip(i, 1)), node: Some(node), ..MeshServiceStatus::default() });
            s
        })
        .collect();
    let settings = NodeSettings {
        interface: "wg-harness".into(),
        subnet: "10.0.0.0/8".parse().expect("a subnet"),
        pod_cidrs: Vec::new(),
        mtu: 1420,
        probe_port: 51821,
        dns_port: 53,
        dns_on_underlay: false,
        expose_ports: Default::default(),
    };
    let (mut build, mut plan) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
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
        let input = NodeInput {
            name: "node-1",
            key: &keys[1],
            settings: &settings,
            fallback: false,
            underlay: None,
            masquerade_underlay: None,
            without_direct: &std::collections::BTreeSet::new(),
        };
        let node_plan = directory.plan(&input).expect("node-1 is in the directory");
        plan = plan.min(started.elapsed());
        assert_eq!(node_plan.device.peers.len(), nodes - 1);
    }
    println!(
        "{nodes} MeshNodes, {services} MeshServices: shared directory {:.1} ms, one node's plan {:.1} ms",
        build.as_secs_f64() * 1e3,
        plan.as_secs_f64() * 1e3
    );
}
