//! A WireGuard "device" that records what is applied to it instead of programming anything:
//! it keeps the state a UAPI device would report after each plan ([`mesh_wireguard::device::applied`])
//! and counts the plans and single-peer changes. Pure: no kube, tokio or netlink.

use mesh_wireguard::{DevicePlan, DeviceState};

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
}
