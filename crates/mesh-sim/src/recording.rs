//! A data plane that records what is applied to it instead of programming anything: a
//! WireGuard device that keeps the state a UAPI device would report after each plan
//! ([`mesh_wireguard::device::applied`]) and counts the plans and single-peer changes, and the
//! link addresses, ruleset and DNS zone it was last given. It implements the agent's
//! [`DataPlane`], so a simulated node runs the agent's own executor. No kube, netlink or nft.

use std::net::Ipv4Addr;
use std::time::Instant;

use mesh_agent::executor::DataPlane;
use mesh_dataplane::dns::Zone;
use mesh_plan::LinkAddresses;
use mesh_wireguard::{DeviceConfig, DevicePlan, DeviceState};

/// The recorded device of one simulated node.
#[derive(Clone, Debug, Default)]
pub struct RecordingDevice {
    state: DeviceState,
    /// Non-empty plans applied.
    pub plans: u64,
    /// Peers added, removed or updated, summed over every plan.
    pub peer_changes: u64,
}

impl RecordingDevice {
    /// What the device reports now (what the agent's `Device::get` returns).
    pub fn get(&self) -> &DeviceState {
        &self.state
    }

    /// Records `plan`: an empty plan is not sent at all, as with the real backends.
    pub fn apply(&mut self, plan: &DevicePlan) {
        if plan.is_empty() {
            return;
        }
        self.state = mesh_wireguard::device::applied(&self.state, plan);
        self.plans += 1;
        self.peer_changes += plan.peers_touched() as u64;
    }
}

/// The recorded data plane of one simulated node.
#[derive(Clone, Debug, Default)]
pub struct RecordingDataPlane {
    /// The device.
    pub device: RecordingDevice,
    /// When the device last changed.
    pub device_changed: Option<Instant>,
    /// The link's addresses, as last configured.
    pub link: Option<LinkAddresses>,
    /// The last ruleset that would have gone to `nft`.
    pub ruleset: Option<String>,
    /// Rulesets that would have gone to `nft` (changes only).
    pub firewall_changes: u64,
    /// Records in the zone last served.
    pub zone_records: usize,
}

impl DataPlane for RecordingDataPlane {
    /// The recording is the device: there is nothing behind it to read back.
    async fn device_diff(&mut self, desired: &DeviceConfig, _read_back: bool) -> anyhow::Result<DevicePlan> {
        Ok(mesh_wireguard::plan(self.device.get(), desired))
    }

    async fn apply_device(&mut self, plan: &DevicePlan) -> anyhow::Result<()> {
        self.device.apply(plan);
        self.device_changed = Some(Instant::now());
        Ok(())
    }

    async fn configure_link(&mut self, wanted: &LinkAddresses) -> anyhow::Result<Vec<String>> {
        if self.link.as_ref() == Some(wanted) {
            return Ok(Vec::new());
        }
        self.link = Some(wanted.clone());
        Ok(vec![format!("{} service addresses", wanted.service_ips.len())])
    }

    async fn apply_firewall(&mut self, ruleset: &str) -> anyhow::Result<bool> {
        if self.ruleset.as_deref() == Some(ruleset) {
            return Ok(false);
        }
        self.ruleset = Some(ruleset.to_owned());
        self.firewall_changes += 1;
        Ok(true)
    }

    fn ensure_echo(&mut self, _node_ip: Ipv4Addr) {}

    async fn serve_dns(&mut self, _listen: &[Ipv4Addr], zone: &Zone) -> anyhow::Result<()> {
        self.zone_records = zone.records.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_wireguard::{DeviceConfig, PeerConfig, PrivateKey, plan};

    use super::*;

    fn config(peers: &[(u8, &str)]) -> DeviceConfig {
        DeviceConfig {
            private_key: PrivateKey::from_bytes([1; 32]),
            listen_port: 51820,
            peers: peers
                .iter()
                .map(|(k, ip)| {
                    let key = PrivateKey::from_bytes([*k; 32]).public_key();
                    (key, PeerConfig { allowed_ips: [ip.parse().expect("an IP net")].into(), ..PeerConfig::default() })
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn records_plans_until_the_device_matches() {
        let mut device = RecordingDevice::default();
        let wanted = config(&[(2, "10.42.0.2/32"), (3, "10.42.0.3/32")]);
        device.apply(&plan(device.get(), &wanted));
        assert_eq!(device.get().peers.len(), 2);
        assert_eq!((device.plans, device.peer_changes), (1, 2));
        // Converged: the next plan is empty and nothing is recorded.
        let again = plan(device.get(), &wanted);
        assert!(again.is_empty());
        device.apply(&again);
        assert_eq!(device.plans, 1);
        // One peer changed: one peer touched.
        device.apply(&plan(device.get(), &config(&[(2, "10.42.0.2/32"), (3, "10.42.0.9/32")])));
        assert_eq!((device.plans, device.peer_changes), (2, 3));
    }

    #[tokio::test]
    async fn the_same_ruleset_is_recorded_once() {
        let mut dataplane = RecordingDataPlane::default();
        assert!(dataplane.apply_firewall("table inet harness_mesh").await.unwrap());
        assert!(!dataplane.apply_firewall("table inet harness_mesh").await.unwrap());
        assert!(dataplane.apply_firewall("table inet harness_mesh {}").await.unwrap());
        assert_eq!(dataplane.firewall_changes, 2);
    }
}
