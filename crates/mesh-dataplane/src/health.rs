//! Peer health: a peer is healthy when one of its last few probes through the tunnel came
//! back. The handshake age says why one is not. [`summary`] turns all peers into the
//! `Connected` condition, with a bounded message that changes only when health changes (no
//! ages or round-trip times in it), so the agent writes status only on real transitions.

use std::collections::VecDeque;
use std::time::Duration;

/// WireGuard's REJECT_AFTER_TIME: a session older than this is dead.
pub const HANDSHAKE_STALE_AFTER: Duration = Duration::from_secs(180);

/// The outcome of the last probes to one peer, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeWindow {
    results: VecDeque<Option<Duration>>,
}

impl ProbeWindow {
    /// How many probe results are kept (for loss and RTT).
    pub const SIZE: usize = 10;
    /// A peer is healthy if one of this many most recent probes came back.
    pub const RECENT: usize = 3;

    /// Records a probe: its round-trip time, or `None` if it was lost.
    pub fn record(&mut self, rtt: Option<Duration>) {
        if self.results.len() == Self::SIZE {
            self.results.pop_front();
        }
        self.results.push_back(rtt);
    }

    /// The fraction of the kept probes that were lost (0 when none were sent).
    pub fn loss(&self) -> f64 {
        if self.results.is_empty() {
            return 0.0;
        }
        self.results.iter().filter(|r| r.is_none()).count() as f64 / self.results.len() as f64
    }

    /// The round-trip time of the latest probe that came back.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.results.iter().rev().find_map(|r| *r)
    }

    /// How many probes were recorded (at most [`Self::SIZE`]).
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// True if no probe was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    fn recent_success(&self) -> bool {
        self.results.iter().rev().take(Self::RECENT).any(Option::is_some)
    }
}

/// Why a peer is not healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// No probe was answered yet, and none was lost either: just added.
    NotProbedYet,
    /// WireGuard never completed a handshake with it.
    NoHandshake,
    /// The last handshake is older than [`HANDSHAKE_STALE_AFTER`].
    HandshakeStale,
    /// Handshakes happen but probes through the tunnel are lost.
    ProbesLost,
}

impl Problem {
    /// A few words for the condition message.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotProbedYet => "not probed yet",
            Self::NoHandshake => "no handshake",
            Self::HandshakeStale => "handshake stale",
            Self::ProbesLost => "probes lost",
        }
    }
}

/// One peer's health.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerHealth {
    /// The peer's node name.
    pub node: String,
    /// `None` when healthy.
    pub problem: Option<Problem>,
}

/// Judges one peer from its probes and handshake age.
pub fn judge(node: &str, probes: &ProbeWindow, handshake_age: Option<Duration>) -> PeerHealth {
    let problem = if probes.recent_success() {
        None
    } else if probes.is_empty() {
        Some(Problem::NotProbedYet)
    } else {
        Some(match handshake_age {
            None => Problem::NoHandshake,
            Some(age) if age > HANDSHAKE_STALE_AFTER => Problem::HandshakeStale,
            Some(_) => Problem::ProbesLost,
        })
    };
    PeerHealth { node: node.to_owned(), problem }
}

/// The `Connected` condition: (status, reason, message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// True when every peer is healthy.
    pub connected: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// At most `max_named` unhealthy peers are named, sorted, with their problem.
    pub message: String,
}

/// Summarises all peers, naming at most `max_named` unhealthy ones.
pub fn summary(peers: &[PeerHealth], max_named: usize) -> Summary {
    if peers.is_empty() {
        return Summary { connected: true, reason: "NoPeers", message: "no other node is in the mesh yet".into() };
    }
    let mut unhealthy: Vec<&PeerHealth> = peers.iter().filter(|p| p.problem.is_some()).collect();
    unhealthy.sort_by(|a, b| a.node.cmp(&b.node));
    let healthy = peers.len() - unhealthy.len();
    if unhealthy.is_empty() {
        return Summary {
            connected: true,
            reason: "AllPeersReachable",
            message: format!("{healthy} of {} peers reachable through the tunnel", peers.len()),
        };
    }
    let named: Vec<String> = unhealthy
        .iter()
        .take(max_named)
        .map(|p| format!("{} ({})", p.node, p.problem.map(Problem::describe).unwrap_or_default()))
        .collect();
    let more = unhealthy.len().saturating_sub(max_named);
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    Summary {
        connected: false,
        reason: if healthy == 0 { "NoPeerReachable" } else { "PeersUnreachable" },
        message: format!("{healthy} of {} peers reachable; not reachable: {}{more}", peers.len(), named.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_recent_answer_makes_a_peer_healthy() {
        let mut w = ProbeWindow::default();
        assert_eq!(judge("b", &w, None).problem, Some(Problem::NotProbedYet));
        w.record(None);
        assert_eq!(judge("b", &w, None).problem, Some(Problem::NoHandshake));
        w.record(Some(MS));
        assert_eq!(judge("b", &w, Some(MS)).problem, None);
        w.record(None);
        w.record(None);
        assert_eq!(judge("b", &w, Some(MS)).problem, None, "the answer is among the last 3");
        w.record(None);
        assert_eq!(judge("b", &w, Some(MS)).problem, Some(Problem::ProbesLost));
        assert_eq!(judge("b", &w, Some(Duration::from_secs(200))).problem, Some(Problem::HandshakeStale));
        assert_eq!(w.last_rtt(), Some(MS));
        assert!((w.loss() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn the_window_keeps_the_last_ten() {
        let mut w = ProbeWindow::default();
        for _ in 0..15 {
            w.record(None);
        }
        w.record(Some(MS));
        assert_eq!(w.len(), ProbeWindow::SIZE);
        assert!((w.loss() - 0.9).abs() < 1e-9);
    }

    #[test]
    fn summary_names_a_bounded_sorted_set() {
        let peers: Vec<PeerHealth> = (0..8)
            .map(|i| PeerHealth { node: format!("n{i}"), problem: (i % 2 == 0).then_some(Problem::NoHandshake) })
            .collect();
        let s = summary(&peers, 3);
        assert!(!s.connected);
        assert_eq!(s.reason, "PeersUnreachable");
        assert_eq!(
            s.message,
            "4 of 8 peers reachable; not reachable: n0 (no handshake), n2 (no handshake), n4 (no handshake) and 1 more"
        );
        let all_good: Vec<PeerHealth> = (0..2).map(|i| PeerHealth { node: format!("n{i}"), problem: None }).collect();
        assert_eq!(summary(&all_good, 3).message, "2 of 2 peers reachable through the tunnel");
        assert!(summary(&[], 3).connected);
    }

    proptest! {
        /// The message stays bounded however many peers are down.
        #[test]
        fn summary_message_is_bounded(down in 0usize..2000, up in 0usize..50) {
            let peers: Vec<PeerHealth> = (0..down)
                .map(|i| PeerHealth { node: format!("node-with-a-long-name-{i:05}"), problem: Some(Problem::ProbesLost) })
                .chain((0..up).map(|i| PeerHealth { node: format!("ok-{i}"), problem: None }))
                .collect();
            let s = summary(&peers, 5);
            prop_assert!(s.message.len() < 400);
            prop_assert_eq!(s.connected, down == 0);
        }
    }
}
