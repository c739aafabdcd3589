//! The thin executor of a [`NodePlan`]: it programs the data plane — the WireGuard device as a
//! diff (`mesh_wireguard::plan`, against the device read back on a resync, else against the
//! state the data plane keeps from its last read and writes), the link's addresses and route,
//! the nftables ruleset, the probe echo, the DNS zone — and only then writes the node's status. A failed status write is
//! reported in [`Executed::status`] and never keeps the data plane from being programmed (the
//! API may be down while peers and services still need their routes).
//!
//! The effects are behind two small traits, [`DataPlane`] and [`StatusSink`]: the agent
//! implements them on the machine and the API, `mesh-sim` with recordings, so both run this very
//! code.

use std::future::Future;
use std::net::Ipv4Addr;

use anyhow::Context;
use mesh_dataplane::dns::Zone;
use mesh_plan::{LinkAddresses, NodePlan};
use mesh_wireguard::{DeviceConfig, DevicePlan};

use crate::cputime::{Step, Took};
use crate::status::Published;

/// What a node's data plane can be told to do.
pub trait DataPlane {
    /// The changes that turn the device into `desired`. With `read_back` (a resync), against the
    /// device as read now; otherwise the data plane may diff against the state it knows the
    /// device to be in (its last read, with every change applied since: see
    /// `mesh_wireguard::Known`), and reads only when it does not know it.
    fn device_diff(
        &mut self,
        desired: &DeviceConfig,
        read_back: bool,
    ) -> impl Future<Output = anyhow::Result<DevicePlan>> + Send;
    /// Applies a non-empty device diff.
    fn apply_device(&mut self, plan: &DevicePlan) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Puts the addresses and route on the link; returns what changed, in words.
    fn configure_link(&mut self, wanted: &LinkAddresses) -> impl Future<Output = anyhow::Result<Vec<String>>> + Send;
    /// Makes `ruleset` the node's nftables table; returns whether that changed anything (the
    /// same ruleset twice is applied once).
    fn apply_firewall(&mut self, ruleset: &str) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Keeps the probe echo running on the node's mesh IP.
    fn ensure_echo(&mut self, node_ip: Ipv4Addr);
    /// Serves `zone` on `listen`.
    fn serve_dns(&mut self, listen: &[Ipv4Addr], zone: &Zone) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Where the node's status goes.
pub trait StatusSink {
    /// Publishes `published` unless already there (see `status::Writer`); returns whether it
    /// wrote. `resync`: compare with the API's copy too, to repair drift.
    fn publish(&mut self, published: &Published, resync: bool) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// What one execution did.
#[derive(Debug)]
pub struct Executed {
    /// The device diff applied (`None`: the device already matched, or it failed).
    pub device: Option<DevicePlan>,
    /// The device matches the plan now.
    pub device_applied: bool,
    /// Changes made to the link.
    pub link_changes: Vec<String>,
    /// The ruleset changed.
    pub firewall_changed: bool,
    /// Programming the data plane: the first step that failed (the later ones were not run).
    pub dataplane: anyhow::Result<()>,
    /// The status write: whether it wrote, or why it failed.
    pub status: anyhow::Result<bool>,
    /// What each step took, in order: `device` (diff, read back on a resync, apply), `link`,
    /// `firewall`, `dns`, `status` (the steps run). Its CPU time counts when the execution runs
    /// inside `cputime::measured`.
    pub steps: Vec<(&'static str, Took)>,
}

/// Programs `plan` into `dataplane` (serving `zone`), then publishes `published` to `status`.
pub async fn execute<D: DataPlane, S: StatusSink>(
    plan: &NodePlan,
    zone: &Zone,
    dataplane: &mut D,
    status: &mut S,
    published: &Published,
    resync: bool,
) -> Executed {
    let mut out = Executed {
        device: None,
        device_applied: false,
        link_changes: Vec::new(),
        firewall_changed: false,
        dataplane: Ok(()),
        status: Ok(false),
        steps: Vec::new(),
    };
    out.dataplane = program(plan, zone, dataplane, resync, &mut out).await;
    let step = Step::start();
    out.status = status.publish(published, resync).await;
    out.steps.push(("status", step.took()));
    out
}

async fn program<D: DataPlane>(
    plan: &NodePlan,
    zone: &Zone,
    dataplane: &mut D,
    resync: bool,
    out: &mut Executed,
) -> anyhow::Result<()> {
    if !plan.fallback {
        let step = Step::start();
        let diff = dataplane.device_diff(&plan.device, resync).await.context("reading the WireGuard device")?;
        if !diff.is_empty() {
            dataplane.apply_device(&diff).await.context("applying the peer changes")?;
            out.device = Some(diff);
        }
        out.device_applied = true;
        out.steps.push(("device", step.took()));
        let local = plan.local.as_ref().map_err(|why| anyhow::anyhow!("{why}"))?;
        let step = Step::start();
        out.link_changes = dataplane.configure_link(&local.link).await?;
        out.steps.push(("link", step.took()));
        let step = Step::start();
        out.firewall_changed = dataplane.apply_firewall(&local.ruleset).await?;
        dataplane.ensure_echo(local.node_ip);
        out.steps.push(("firewall", step.took()));
    }
    if !plan.dns_listen.is_empty() {
        let step = Step::start();
        dataplane.serve_dns(&plan.dns_listen, zone).await?;
        out.steps.push(("dns", step.took()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mesh_api::{Backend, MeshNode, MeshNodeSpec, MeshNodeStatus, PeerEntry};
    use mesh_dataplane::dns::ShortNames;
    use mesh_plan::{Directory, NodeInput, NodeSettings, convert};
    use mesh_wireguard::{DeviceState, PrivateKey};

    use super::*;

    /// Records every call, in order; fails the device apply when told to.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        state: DeviceState,
        ruleset: Option<String>,
        fail_device: bool,
    }

    impl DataPlane for Recorder {
        async fn device_diff(&mut self, desired: &DeviceConfig, _: bool) -> anyhow::Result<DevicePlan> {
            self.calls.push("device");
            Ok(mesh_wireguard::plan(&self.state, desired))
        }
        async fn apply_device(&mut self, plan: &DevicePlan) -> anyhow::Result<()> {
            self.calls.push("apply_device");
            anyhow::ensure!(!self.fail_device, "the device is gone");
            self.state = mesh_wireguard::device::applied(&self.state, plan);
            Ok(())
        }
        async fn configure_link(&mut self, _: &LinkAddresses) -> anyhow::Result<Vec<String>> {
            self.calls.push("link");
            Ok(Vec::new())
        }
        async fn apply_firewall(&mut self, ruleset: &str) -> anyhow::Result<bool> {
            self.calls.push("firewall");
            let changed = self.ruleset.as_deref() != Some(ruleset);
            self.ruleset = Some(ruleset.to_owned());
            Ok(changed)
        }
        fn ensure_echo(&mut self, _: Ipv4Addr) {
            self.calls.push("echo");
        }
        async fn serve_dns(&mut self, _: &[Ipv4Addr], _: &Zone) -> anyhow::Result<()> {
            self.calls.push("dns");
            Ok(())
        }
    }

    /// A status sink whose API is down.
    struct Down<'a>(&'a mut Vec<&'static str>);

    impl StatusSink for Down<'_> {
        async fn publish(&mut self, _: &Published, _: bool) -> anyhow::Result<bool> {
            self.0.push("status");
            anyhow::bail!("the API server is not reachable")
        }
    }

    fn node(name: &str, i: u8) -> MeshNode {
        let public = PrivateKey::from_bytes([i; 32]).public_key().to_base64();
        let mut node = MeshNode::new(name, MeshNodeSpec::default());
        node.status = Some(MeshNodeStatus {
            mesh_ip: Some(format!("10.42.0.{i}")),
            endpoint: Some(format!("192.168.77.{i}:51820")),
            peer: Some(PeerEntry {
                public_key: public,
                endpoint: Some(format!("192.168.77.{i}:51820")),
                allowed_ips: vec![format!("10.42.0.{i}/32")],
                persistent_keepalive: None,
            }),
            ..MeshNodeStatus::default()
        });
        node
    }

    fn plan() -> (NodePlan, Zone) {
        let dir = Directory::build(
            &[node("a", 1), node("b", 2)],
            &[],
            Some("10.42.0.0/16".parse().unwrap()),
            &ShortNames::Every,
            convert::literal_endpoint,
        );
        let settings = NodeSettings::defaults("10.42.0.0/16".parse().unwrap());
        let key = PrivateKey::from_bytes([1; 32]);
        let input = NodeInput {
            name: "a",
            key: &key,
            settings: &settings,
            fallback: false,
            underlay: None,
            masquerade_underlay: None,
            without_direct: &std::collections::BTreeSet::new(),
            containers: &std::collections::BTreeMap::new(),
        };
        (dir.plan(&input).unwrap(), dir.zone().clone())
    }

    fn published() -> Published {
        Published {
            public_key: None,
            endpoint: None,
            listen_port: 51820,
            backend: Backend::Kernel,
            connected: None,
            paths: None,
            containers: Vec::new(),
            engine: None,
        }
    }

    #[tokio::test]
    async fn the_data_plane_is_programmed_before_the_status_and_a_failed_write_does_not_undo_it() {
        let (plan, zone) = plan();
        let mut dataplane = Recorder::default();
        let mut status_calls = Vec::new();
        let executed = execute(&plan, &zone, &mut dataplane, &mut Down(&mut status_calls), &published(), false).await;
        assert_eq!(dataplane.calls, ["device", "apply_device", "link", "firewall", "echo", "dns"]);
        assert_eq!(status_calls, ["status"], "the status is written after, once");
        assert!(executed.dataplane.is_ok() && executed.device_applied && executed.firewall_changed);
        assert_eq!(executed.device.as_ref().map(|d| d.add.len()), Some(1));
        assert!(executed.status.unwrap_err().to_string().contains("not reachable"));
        assert_eq!(dataplane.state.peers.len(), 1, "the peer is on the device although the status write failed");
        let steps: Vec<&str> = executed.steps.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps, ["device", "link", "firewall", "dns", "status"], "each step timed, in order");

        // Again: nothing to change on the device or the firewall.
        let executed = execute(&plan, &zone, &mut dataplane, &mut Down(&mut status_calls), &published(), false).await;
        assert!(executed.device.is_none() && !executed.firewall_changed);
    }

    #[tokio::test]
    async fn a_failed_device_stops_the_data_plane_but_the_status_is_still_published() {
        let (plan, zone) = plan();
        let mut dataplane = Recorder { fail_device: true, ..Recorder::default() };
        let mut status_calls = Vec::new();
        let executed = execute(&plan, &zone, &mut dataplane, &mut Down(&mut status_calls), &published(), false).await;
        assert_eq!(dataplane.calls, ["device", "apply_device"]);
        assert_eq!(status_calls, ["status"]);
        assert!(!executed.device_applied);
        let steps: Vec<&str> = executed.steps.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps, ["status"], "the steps not run are not timed");
        assert!(format!("{:#}", executed.dataplane.unwrap_err()).contains("applying the peer changes"));
    }
}
