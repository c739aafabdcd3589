//! A rogue peer, for the attack suites (issue 17): a lab node that uses its own WireGuard device
//! against another node. WireGuard checks only the *source* of what it receives against the
//! sender's allowed IPs, never the destination, so a peer that is root on its own machine (an
//! enrolled machine is) can send anything through another node: it adds the destination to that
//! node's allowed IPs on its own device (so its WireGuard sends it there, and accepts the
//! replies), and a policy route from its mesh IP to the destination through `wg-harness` (so
//! that nothing else of its own traffic, WireGuard's UDP to the underlay included, changes).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;

use crate::mesh::{Mesh, NodeInfo};

/// How long [`Mesh::connects_from`] waits for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node's underlay address, from the endpoint in its MeshNode status.
pub fn underlay(info: &BTreeMap<String, NodeInfo>, node: &str) -> anyhow::Result<Ipv4Addr> {
    let endpoint = &info.get(node).with_context(|| format!("{node} has no endpoint"))?.endpoint;
    Ok(endpoint.split(':').next().unwrap_or_default().parse()?)
}

/// The rogue configuration on `attacker`: `target` is sent from the attacker's mesh IP through
/// `wg-harness` to the victim's peer. Dropping it puts the attacker's node back as it was.
pub struct Detour<'a> {
    mesh: &'a Mesh,
    attacker: String,
    victim_key: String,
    /// The victim's allowed IPs as the attacker's agent set them.
    original: String,
    target: Ipv4Addr,
    table: &'static str,
}

impl<'a> Detour<'a> {
    /// Routes `target` from `attacker` (whose mesh IP is `from`) to `victim`'s peer, through
    /// routing table `table` (a number no other test uses).
    pub fn new(
        mesh: &'a Mesh,
        (attacker, from): (&str, Ipv4Addr),
        victim: &NodeInfo,
        target: Ipv4Addr,
        table: &'static str,
    ) -> anyhow::Result<Self> {
        let (attacker, victim_key) = (attacker.to_owned(), victim.public_key.clone());
        let listed = mesh.nodes.exec_ok(&attacker, &["wg", "show", "wg-harness", "allowed-ips"])?;
        let original = listed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{victim_key}\t")))
            .with_context(|| format!("{attacker} has no peer {victim_key}: {listed}"))?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(",");
        let to = format!("{target}/32");
        mesh.nodes.exec_ok(&attacker, &["ip", "rule", "add", "from", &from.to_string(), "to", &to, "lookup", table])?;
        let detour = Self { mesh, attacker, victim_key, original, target, table };
        mesh.nodes.exec_ok(&detour.attacker, &["ip", "route", "replace", &to, "dev", "wg-harness", "table", table])?;
        detour.arm()?;
        Ok(detour)
    }

    /// (Re)adds the target to the victim's allowed IPs on the attacker's device: the attacker's
    /// agent puts the directory's list back on its next sync, so call this right before every
    /// attempt.
    pub fn arm(&self) -> anyhow::Result<()> {
        let ips = format!("{},{}/32", self.original, self.target);
        self.mesh
            .nodes
            .exec_ok(&self.attacker, &["wg", "set", "wg-harness", "peer", &self.victim_key, "allowed-ips", &ips])?;
        Ok(())
    }
}

impl Drop for Detour<'_> {
    fn drop(&mut self) {
        let nodes = &self.mesh.nodes;
        let to = format!("{}/32", self.target);
        let _ = nodes.exec(&self.attacker, &["ip", "rule", "del", "to", &to, "lookup", self.table]);
        let _ = nodes.exec(&self.attacker, &["ip", "route", "flush", "table", self.table]);
        let _ = nodes.exec(
            &self.attacker,
            &["wg", "set", "wg-harness", "peer", &self.victim_key, "allowed-ips", &self.original],
        );
    }
}

impl Mesh {
    /// Whether a TCP connection from `node` (from `source`) to `ip:port` is established within
    /// [`CONNECT_TIMEOUT`]; nothing is sent or read.
    pub fn connects_from(&self, node: &str, source: Ipv4Addr, ip: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
        let timeout = CONNECT_TIMEOUT.as_secs().to_string();
        let to = format!("TCP:{ip}:{port},connect-timeout={timeout},bind={source}");
        Ok(self.nodes.exec(node, &["socat", "-T", &timeout, "-u", "/dev/null", &to])?.status.success())
    }
}
