//! `meshctl showconf NODE`: the wg-quick configuration of one node, built from the API the way
//! its agent builds `wg-harness` (the same peers, skipped for the same reasons), with the
//! private key as a placeholder: it never leaves the node. Pure: objects in, text out.

use std::collections::BTreeMap;
use std::fmt;

use mesh_api::{Backend, MeshNode, MeshService};

/// Where the agent keeps the private key by default (`--state-dir`).
pub const DEFAULT_KEY_PATH: &str = "/var/lib/harness-mesh/private.key";

/// Why there is no configuration to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShowconfError {
    /// No MeshNode of that name.
    NotFound {
        /// The name asked for.
        name: String,
        /// The MeshNodes that exist.
        known: Vec<String>,
    },
    /// The node has no mesh IP yet.
    NoMeshIp {
        /// The node.
        name: String,
        /// Its Ready condition's message, when it has one.
        why: Option<String>,
    },
}

impl fmt::Display for ShowconfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { name, known } if known.is_empty() => {
                write!(f, "MeshNode {name:?} not found: the cluster has no MeshNodes (is mesh-controller running?)")
            }
            Self::NotFound { name, known } => {
                write!(f, "MeshNode {name:?} not found; the mesh has: {} (see `meshctl status`)", known.join(", "))
            }
            Self::NoMeshIp { name, why } => {
                write!(f, "MeshNode {name:?} has no mesh IP yet, so it has no WireGuard config")?;
                match why {
                    Some(why) => write!(f, ": {why}"),
                    None => write!(f, ": is mesh-controller running?"),
                }
            }
        }
    }
}

impl std::error::Error for ShowconfError {}

/// The wg-quick config of MeshNode `name`: its `[Interface]` and one `[Peer]` per other node
/// that has a usable peer entry; nodes without one are listed in comments.
pub fn render(name: &str, nodes: &[MeshNode], services: &[MeshService]) -> Result<String, ShowconfError> {
    let node_name = |n: &MeshNode| n.metadata.name.clone().unwrap_or_default();
    let Some(me) = nodes.iter().find(|n| node_name(n) == name) else {
        let mut known: Vec<String> = nodes.iter().map(node_name).collect();
        known.sort();
        return Err(ShowconfError::NotFound { name: name.to_owned(), known });
    };
    let status = me.status.clone().unwrap_or_default();
    let Some(mesh_ip) = status.mesh_ip.clone() else {
        let why =
            status.conditions.iter().find(|c| c.type_ == "Ready" && c.status != "True").map(|c| c.message.clone());
        return Err(ShowconfError::NoMeshIp { name: name.to_owned(), why });
    };

    let mut out = String::new();
    out.push_str(&format!(
        "# wg-quick config of MeshNode {name} (interface wg-harness), read from the API by meshctl.\n"
    ));
    out.push_str("# mesh-agent programs wg-harness itself; compare with `wg showconf wg-harness` on the node.\n");
    if status.backend == Some(Backend::None) {
        out.push_str(&format!(
            "# {name} runs without WireGuard (backend none): this is the config it would use, and no node has it as a peer.\n"
        ));
    } else if status.public_key.is_none() {
        out.push_str(&format!(
            "# {name}'s agent has not published its public key yet: no other node has it as a peer.\n"
        ));
    }
    out.push_str("[Interface]\n");
    if let Some(key) = &status.public_key {
        out.push_str(&format!("# PublicKey = {key}\n"));
    }
    out.push_str(&format!(
        "PrivateKey = <placeholder: the key never leaves the node; it is in {DEFAULT_KEY_PATH} on {name}>\n"
    ));
    out.push_str(&format!("Address = {mesh_ip}/32\n"));
    let mut hosted: Vec<(String, String)> = services
        .iter()
        .filter_map(|s| {
            let st = s.status.as_ref()?;
            (st.node.as_deref() == Some(name)).then_some(())?;
            let ip = st.mesh_ip.clone()?;
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            Some((ip, format!("{ns}/{}", s.metadata.name.clone().unwrap_or_default())))
        })
        .collect();
    hosted.sort();
    if !hosted.is_empty() {
        let names: Vec<&str> = hosted.iter().map(|(_, n)| n.as_str()).collect();
        let ips: Vec<String> = hosted.iter().map(|(ip, _)| format!("{ip}/32")).collect();
        out.push_str(&format!("# the services hosted here: {}\n", names.join(", ")));
        out.push_str(&format!("Address = {}\n", ips.join(", ")));
    }
    let port = status.listen_port.unwrap_or(me.spec.listen_port);
    out.push_str(&format!("ListenPort = {port}\n"));

    let mut others: Vec<&MeshNode> = nodes.iter().filter(|n| node_name(n) != name).collect();
    others.sort_by_key(|n| node_name(n));
    let mut by_key: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for other in &others {
        if let Some(peer) = other.status.as_ref().and_then(|s| s.peer.as_ref()) {
            by_key.entry(peer.public_key.as_str()).or_default().push(node_name(other));
        }
    }
    let mut skipped = Vec::new();
    for other in others {
        let other_name = node_name(other);
        let st = other.status.clone().unwrap_or_default();
        let Some(peer) = st.peer else {
            skipped.push(match (st.backend, &st.public_key) {
                (Some(Backend::None), _) => format!("{other_name}: runs without WireGuard (backend none)"),
                (_, None) => format!("{other_name}: its agent has not published a public key yet"),
                (_, Some(_)) => format!("{other_name}: the controller has not written its peer entry yet"),
            });
            continue;
        };
        if status.public_key.as_deref() == Some(peer.public_key.as_str()) {
            skipped.push(format!("{other_name}: publishes {name}'s own public key"));
            continue;
        }
        if let Some(sharing) = by_key.get(peer.public_key.as_str()).filter(|names| names.len() > 1) {
            skipped.push(format!("{other_name}: its public key is published by several nodes: {}", sharing.join(", ")));
            continue;
        }
        out.push_str(&format!("\n# {other_name}"));
        if let Some(ip) = &st.mesh_ip {
            out.push_str(&format!(" ({ip})"));
        }
        out.push_str("\n[Peer]\n");
        out.push_str(&format!("PublicKey = {}\n", peer.public_key));
        if let Some(endpoint) = &peer.endpoint {
            out.push_str(&format!("Endpoint = {endpoint}\n"));
        }
        out.push_str(&format!("AllowedIPs = {}\n", peer.allowed_ips.join(", ")));
        if let Some(keepalive) = peer.persistent_keepalive.filter(|k| *k > 0) {
            out.push_str(&format!("PersistentKeepalive = {keepalive}\n"));
        }
    }
    if !skipped.is_empty() {
        out.push_str("\n# no [Peer] for:\n");
        for why in skipped {
            out.push_str(&format!("#   {why}\n"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{lab, node};

    fn peers(conf: &str) -> usize {
        conf.lines().filter(|l| *l == "[Peer]").count()
    }

    #[test]
    fn one_peer_per_other_node_with_a_peer_entry() {
        let (mut nodes, services) = lab();
        nodes[2].status.as_mut().unwrap().peer.as_mut().unwrap().persistent_keepalive = Some(25);
        let conf = render("hm-node-1", &nodes, &services).unwrap();
        assert_eq!(conf.matches("[Interface]").count(), 1);
        assert_eq!(peers(&conf), 2, "{conf}");
        assert!(conf.contains(
            "PrivateKey = <placeholder: the key never leaves the node; it is in /var/lib/harness-mesh/private.key on hm-node-1>\n"
        ));
        assert!(conf.contains("Address = 10.42.0.1/32\n"));
        assert!(conf.contains("# the services hosted here: web/api\nAddress = 10.42.1.6/32\n"), "{conf}");
        assert!(conf.contains("ListenPort = 51820\n"));
        let n2 = nodes[1].status.as_ref().unwrap().peer.clone().unwrap();
        assert!(conf.contains(&format!(
            "# hm-node-2 (10.42.0.2)\n[Peer]\nPublicKey = {}\nEndpoint = 192.168.77.2:51820\nAllowedIPs = 10.42.0.2/32\n",
            n2.public_key
        )));
        assert!(conf.contains("AllowedIPs = 10.42.0.3/32\nPersistentKeepalive = 25\n"), "{conf}");
        assert!(!conf.contains("PersistentKeepalive = 0"));
        assert!(conf.contains("#   hm-node-4: runs without WireGuard (backend none)\n"), "{conf}");
        // Every non-comment line is a section or `Key = value`.
        for line in conf.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert!(line.starts_with('[') || line.contains(" = "), "{line:?}");
        }
    }

    #[test]
    fn a_copied_or_shared_key_gets_no_peer() {
        let (mut nodes, services) = lab();
        let key = nodes[0].status.as_ref().unwrap().public_key.clone().unwrap();
        nodes[1].status.as_mut().unwrap().peer.as_mut().unwrap().public_key = key;
        let conf = render("hm-node-1", &nodes, &services).unwrap();
        assert_eq!(peers(&conf), 1);
        assert!(conf.contains("hm-node-2: publishes hm-node-1's own public key"));
        let conf = render("hm-node-3", &nodes, &services).unwrap();
        assert_eq!(peers(&conf), 0, "{conf}");
        assert!(conf.contains("published by several nodes: hm-node-1, hm-node-2"));
    }

    #[test]
    fn clear_errors() {
        let (nodes, services) = lab();
        let err = render("nope", &nodes, &services).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MeshNode \"nope\" not found; the mesh has: hm-node-1, hm-node-2, hm-node-3, hm-node-4 (see `meshctl status`)"
        );
        let mut fresh = node("fresh", 9, None);
        fresh.status.as_mut().unwrap().mesh_ip = None;
        let err = render("fresh", &[fresh], &[]).unwrap_err();
        assert!(err.to_string().starts_with("MeshNode \"fresh\" has no mesh IP yet"), "{err}");
        assert!(render("x", &[], &[]).unwrap_err().to_string().contains("no MeshNodes"));
    }
}
