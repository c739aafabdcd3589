//! Reading an agent's `Connected` condition back into numbers and names.
//!
//! The agent (`mesh_dataplane::health::summary`) writes one of:
//!
//! - `no other node is in the mesh yet` (reason `NoPeers`);
//! - `2 of 2 peers reachable through the tunnel` (reason `AllPeersReachable`);
//! - `1 of 3 peers reachable; not reachable: hm-node-3 (no handshake), hm-node-4 (probes lost)`,
//!   naming at most 5 peers and ending in ` and N more` beyond that (reasons `PeersUnreachable`,
//!   `NoPeerReachable`);
//! - why there is no tunnel (reason `NoTunnel`).
//!
//! The condition is the only per-peer health in the API, so meshctl reads it; a message it does
//! not understand yields `None` and every cell of that node's row becomes "unknown".

/// What a node's agent says about its peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Peers that answered one of their last probes.
    pub reachable: u32,
    /// Peers the agent has applied and probes (its view of the peer set).
    pub total: u32,
    /// Named unreachable peers with the agent's reason, e.g. `("hm-node-3", "no handshake")`.
    pub unreachable: Vec<(String, String)>,
    /// Unreachable peers beyond the named ones (` and N more`): which ones is not said.
    pub unnamed: u32,
}

impl Report {
    /// Whether every unreachable peer is named, so any other peer in the agent's set is
    /// reachable.
    pub fn complete(&self) -> bool {
        self.unnamed == 0
    }

    /// The agent's reason for `peer` being unreachable, when it names it.
    pub fn problem(&self, peer: &str) -> Option<&str> {
        self.unreachable.iter().find(|(name, _)| name == peer).map(|(_, why)| why.as_str())
    }
}

/// Parses a `Connected` condition's reason and message; `None` for `NoTunnel` or a message in
/// another format.
pub fn parse(reason: &str, message: &str) -> Option<Report> {
    if reason == "NoTunnel" {
        return None;
    }
    if reason == "NoPeers" || message == "no other node is in the mesh yet" {
        return Some(Report::default());
    }
    let (reachable, rest) = message.split_once(" of ")?;
    let reachable: u32 = reachable.trim().parse().ok()?;
    let (total, rest) = rest.split_once(" peers reachable")?;
    let total: u32 = total.trim().parse().ok()?;
    let mut report = Report { reachable, total, ..Report::default() };
    if rest.is_empty() || rest == " through the tunnel" {
        return (reachable == total).then_some(report);
    }
    let list = rest.strip_prefix("; not reachable: ")?;
    let list = match list.rsplit_once(" and ") {
        Some((named, more)) if more.ends_with(" more") => {
            report.unnamed = more.trim_end_matches(" more").trim().parse().ok()?;
            named
        }
        _ => list,
    };
    for item in list.split(", ") {
        let (name, why) = item.split_once(" (")?;
        let why = why.strip_suffix(')')?;
        report.unreachable.push((name.trim().to_owned(), why.to_owned()));
    }
    Some(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_format_the_agent_writes() {
        assert_eq!(parse("NoPeers", "no other node is in the mesh yet"), Some(Report::default()));
        assert_eq!(
            parse("AllPeersReachable", "2 of 2 peers reachable through the tunnel"),
            Some(Report { reachable: 2, total: 2, ..Report::default() })
        );
        let r = parse("PeersUnreachable", "2 of 3 peers reachable; not reachable: hm-node-3 (no handshake)").unwrap();
        assert_eq!((r.reachable, r.total, r.unnamed), (2, 3, 0));
        assert_eq!(r.problem("hm-node-3"), Some("no handshake"));
        assert_eq!(r.problem("hm-node-2"), None);
        assert!(r.complete());
        let r = parse(
            "PeersUnreachable",
            "4 of 8 peers reachable; not reachable: n0 (no handshake), n2 (not probed yet), n4 (handshake stale) and 1 more",
        )
        .unwrap();
        assert_eq!(r.unreachable.len(), 3);
        assert_eq!(r.problem("n2"), Some("not probed yet"));
        assert_eq!(r.unnamed, 1);
        assert!(!r.complete());
        let r = parse("NoPeerReachable", "0 of 1 peers reachable; not reachable: a-b (probes lost)").unwrap();
        assert_eq!(r.problem("a-b"), Some("probes lost"));
    }

    #[test]
    fn anything_else_is_not_understood() {
        assert_eq!(parse("NoTunnel", "no /dev/net/tun; this node's services are reached at its host address"), None);
        assert_eq!(parse("Whatever", "all good"), None);
        assert_eq!(parse("PeersUnreachable", "2 of 3 peers reachable; not reachable: garbage"), None);
        assert_eq!(parse("AllPeersReachable", "x of 2 peers reachable through the tunnel"), None);
        assert_eq!(parse("AllPeersReachable", "1 of 2 peers reachable through the tunnel"), None);
    }
}
