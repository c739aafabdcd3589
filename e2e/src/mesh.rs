//! The mesh under test: nodes with agents, converged. [`Mesh::get`] brings the lab up with
//! enough nodes (or uses the cluster the environment names) and waits until every node has a
//! mesh IP, a published key, and reports all its peers reachable.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kube::api::Api;
use mesh_api::MeshNode;
use mesh_api::conditions::CONNECTED;

use crate::nodes::Nodes;
use crate::{Cluster, start_lab_with_nodes};

/// How many nodes the suite needs.
pub const NODES: usize = 3;

/// A converged mesh.
pub struct Mesh {
    /// The API.
    pub cluster: Cluster,
    /// The nodes.
    pub nodes: Nodes,
}

/// One node as the API reports it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Its mesh IP.
    pub mesh_ip: Ipv4Addr,
    /// Its public key.
    pub public_key: String,
    /// Its underlay endpoint.
    pub endpoint: String,
}

impl Mesh {
    /// The cluster with its nodes, once every node is connected to every other (at most
    /// `within`).
    pub async fn get(within: Duration) -> anyhow::Result<Self> {
        Self::get_nodes(NODES, within).await
    }

    /// As [`Mesh::get`], with the first `count` nodes of the lab (made if missing).
    pub async fn get_nodes(count: usize, within: Duration) -> anyhow::Result<Self> {
        if std::env::var_os("HARNESS_MESH_NODES").is_none() {
            // Idempotent: also restarts what earlier suites stopped (the lab controller) and
            // re-creates the lab's MeshNodes if an earlier suite deleted them.
            tokio::task::spawn_blocking(move || start_lab_with_nodes(count)).await??;
        }
        let cluster = Cluster::get().await?;
        let nodes = Nodes::discover(count)?;
        let mesh = Self { cluster, nodes };
        mesh.wait_connected(within).await?;
        Ok(mesh)
    }

    /// As [`Mesh::get`], for the suites that need real pods: fails unless the lab runs in kubelet
    /// mode.
    pub async fn get_kubelet(within: Duration) -> anyhow::Result<Self> {
        let mesh = Self::get(within).await?;
        anyhow::ensure!(
            crate::lab_mode().as_deref() == Some("kubelet"),
            "these tests need the lab in kubelet mode: e2e/lab/lab.sh down, then make kubelet-e2e"
        );
        Ok(mesh)
    }

    /// Every node's mesh IP, key and endpoint, by name (only nodes that have all three).
    pub async fn info(&self) -> anyhow::Result<BTreeMap<String, NodeInfo>> {
        let api: Api<MeshNode> = Api::all(self.cluster.client.clone());
        let mut out = BTreeMap::new();
        for name in &self.nodes.names {
            let Some(node) = api.get_opt(name).await? else { continue };
            let Some(status) = node.status else { continue };
            if let (Some(ip), Some(key), Some(endpoint)) = (status.mesh_ip, status.public_key, status.endpoint) {
                out.insert(name.clone(), NodeInfo { mesh_ip: ip.parse()?, public_key: key, endpoint });
            }
        }
        Ok(out)
    }

    /// Waits until every node reports `Connected=True` with all other suite nodes among its
    /// WireGuard peers.
    pub async fn wait_connected(&self, within: Duration) -> anyhow::Result<()> {
        let api: Api<MeshNode> = Api::all(self.cluster.client.clone());
        let deadline = Instant::now() + within;
        loop {
            let mut waiting = Vec::new();
            for name in &self.nodes.names {
                let node = api.get_opt(name).await?;
                let connected = node
                    .as_ref()
                    .and_then(|n| n.status.as_ref())
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONNECTED))
                    .map(|c| (c.status.clone(), c.message.clone()));
                // All its peers reachable: the suite's other nodes, and any other node that has
                // joined (the cluster may have more than the suite's).
                match connected {
                    Some((status, message))
                        if status == "True" && all_reachable(&message).is_some_and(|k| k as usize >= NODES - 1) => {}
                    other => waiting.push(format!("{name}: {other:?}")),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the mesh did not converge within {within:?}: {}", waiting.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The peer public keys on `node`'s device, as `wg show wg-harness peers` prints them.
    pub fn wg_peers(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let out = self.nodes.exec_ok(node, &["wg", "show", "wg-harness", "peers"]).context("wg show")?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// One `iperf3 -t SECONDS` TCP run from `client` to `ip:port`, where a server already listens,
    /// in bit/s (`end.sum_received`); retried a few times while the server starts.
    pub fn iperf_client(&self, client: &str, ip: &str, port: u16, seconds: u32) -> anyhow::Result<f64> {
        let (port_text, secs) = (port.to_string(), seconds.to_string());
        let limit = (seconds + 15).to_string();
        let mut error = serde_json::Value::Null;
        for _ in 0..20 {
            let out = self
                .nodes
                .exec(client, &["timeout", &limit, "iperf3", "-c", ip, "-p", &port_text, "-t", &secs, "-J"])?;
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(bps) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps);
            }
            error = report["error"].clone();
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("iperf3 from {client} to {ip}:{port} gave no result: {error}")
    }

    /// As [`Mesh::iperf_client`], against a one-shot `iperf3 -s -1` started on `server` for it.
    pub fn iperf(&self, server: &str, client: &str, ip: Ipv4Addr, port: u16, seconds: u32) -> anyhow::Result<f64> {
        let mut listener =
            self.nodes.spawn(server, &["timeout", "60", "iperf3", "-s", "-1", "-p", &port.to_string()])?;
        let result = self.iperf_client(client, &ip.to_string(), port, seconds);
        let _ = listener.kill();
        let _ = listener.wait();
        result
    }

    /// Pings `target` from `node`, `count` times at `interval`; returns (sent, received, avg
    /// rtt ms) from ping's summary.
    pub fn ping(&self, node: &str, target: Ipv4Addr, count: u32, interval: f64) -> anyhow::Result<PingStats> {
        let out = self.nodes.exec(
            node,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                &interval.to_string(),
                "-W",
                "1",
                &target.to_string(),
            ],
        )?;
        PingStats::parse(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("ping from {node} to {target}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `K` when a `Connected` message says that all `K` of `K` peers are reachable
/// (`2 of 2 peers reachable through the tunnel`), else `None`.
pub fn all_reachable(message: &str) -> Option<u32> {
    let (reachable, rest) = message.split_once(" of ")?;
    let (total, rest) = rest.split_once(" peers reachable")?;
    let (reachable, total): (u32, u32) = (reachable.trim().parse().ok()?, total.trim().parse().ok()?);
    (reachable == total && !rest.starts_with(';')).then_some(total)
}

/// What ping's summary says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Average round-trip time in milliseconds, if any reply came.
    pub avg_ms: Option<f64>,
}

impl PingStats {
    /// Parses iputils ping's `-q` summary.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let line = text.lines().find(|l| l.contains("packets transmitted")).context("no ping summary")?;
        let numbers: Vec<u32> =
            line.split(',').filter_map(|part| part.split_whitespace().next()?.parse().ok()).take(2).collect();
        let [sent, received] = numbers[..] else { bail!("unexpected ping summary {line:?}") };
        let avg_ms = text
            .lines()
            .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(1))
            .and_then(|v| v.parse().ok());
        Ok(Self { sent, received, avg_ms })
    }
}

/// A 10 pps ping from one node that runs until [`Pinger::stop`]: what a user's traffic sees while
/// something restarts. Only replies decide: a request is lost when a later one was answered and
/// it was not, so a request still in flight when the ping is stopped does not count.
pub struct Pinger {
    node: String,
    target: Ipv4Addr,
    count: String,
    child: std::process::Child,
}

/// What a [`Pinger`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Losses {
    /// The highest sequence number answered.
    pub last_answered: u32,
    /// Requests sent.
    pub sent: u32,
    /// Sequence numbers at or below `last_answered` that got no reply.
    pub lost: Vec<u32>,
}

impl Losses {
    /// Reads iputils ping's per-reply lines (`icmp_seq=N`) and its summary.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let sent = PingStats::parse(text)?.sent;
        let answered: std::collections::BTreeSet<u32> = text
            .lines()
            .filter(|l| l.contains(" bytes from ") && !l.contains("DUP!"))
            .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        let last_answered = answered.last().copied().unwrap_or(0);
        let lost = (1..=last_answered).filter(|seq| !answered.contains(seq)).collect();
        Ok(Self { last_answered, sent, lost })
    }
}

/// The UDP payloads of the IPv4 packets in a pcap capture (libpcap format, Ethernet link type)
/// sent to or from `port`.
pub fn udp_payloads(pcap: &[u8], port: u16) -> Vec<&[u8]> {
    let mut out = Vec::new();
    if pcap.len() < 24 || pcap[..4] != [0xd4, 0xc3, 0xb2, 0xa1] || pcap[20..24] != [1, 0, 0, 0] {
        return out;
    }
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        // Ethernet, IPv4, UDP.
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            continue;
        }
        let ip_header = usize::from(frame[14] & 0x0f) * 4;
        let udp = 14 + ip_header;
        let Some(header) = frame.get(udp..udp + 8) else { continue };
        let (source, destination) =
            (u16::from_be_bytes([header[0], header[1]]), u16::from_be_bytes([header[2], header[3]]));
        if source == port || destination == port {
            out.push(&frame[udp + 8..]);
        }
    }
    out
}

/// Tells pingers apart on a node (their count is unique), so that stopping one stops no other.
static PINGERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Mesh {
    /// Starts pinging `target` from `node` ten times a second, for at most `max` (a bound: call
    /// [`Pinger::stop`] when done).
    pub fn start_ping(&self, node: &str, target: Ipv4Addr, max: Duration) -> anyhow::Result<Pinger> {
        let unique = PINGERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let count = (max.as_secs() as u32 * 10 / 100 * 100 + 100 + unique).to_string();
        let target_text = target.to_string();
        let child = self.nodes.spawn(node, &["ping", "-n", "-i", "0.1", "-W", "1", "-c", &count, &target_text])?;
        Ok(Pinger { node: node.to_owned(), target, count, child })
    }
}

impl Pinger {
    /// Stops the ping (SIGINT, so that it prints its summary) and reads what it saw. Fails when
    /// the ping had ended by itself: then it did not watch the whole event.
    pub fn stop(mut self, mesh: &Mesh) -> anyhow::Result<Losses> {
        use std::io::Read as _;
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the ping from {} to {} ended by itself ({status}) before it was stopped: the event outlasted the \
                 window given to start_ping",
                self.node,
                self.target
            );
        }
        let pattern = format!("^ping -n -i 0.1 -W 1 -c {} {}$", self.count, self.target);
        let _ = mesh.nodes.exec(&self.node, &["pkill", "-INT", "-f", &pattern]);
        let mut text = String::new();
        let _ = self.child.wait();
        self.child.stdout.take().context("ping stdout")?.read_to_string(&mut text)?;
        Losses::parse(&text).with_context(|| format!("ping from {} to {}: {text}", self.node, self.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iputils_summaries() {
        let text = "PING 10.42.0.2 (10.42.0.2) 56(84) bytes of data.\n\n--- 10.42.0.2 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 4005ms\nrtt min/avg/max/mdev = 0.201/0.333/0.512/0.100 ms\n";
        assert_eq!(PingStats::parse(text).unwrap(), PingStats { sent: 5, received: 4, avg_ms: Some(0.333) });
        let none = "--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n";
        assert_eq!(PingStats::parse(none).unwrap(), PingStats { sent: 3, received: 0, avg_ms: None });
        assert!(PingStats::parse("garbage").is_err());
    }

    #[test]
    fn udp_payloads_are_read_from_a_pcap_capture() {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0, 0, 0];
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 192, 168, 77, 1, 192, 168, 77, 2];
        ip.extend(51820u16.to_be_bytes());
        ip.extend(51820u16.to_be_bytes());
        ip.extend([0, 12, 0, 0, 4, 0, 0, 0]);
        frame.extend(ip);
        let len = (frame.len() as u32).to_le_bytes();
        pcap.extend([0; 8]);
        pcap.extend(len);
        pcap.extend(len);
        pcap.extend(&frame);
        assert_eq!(udp_payloads(&pcap, 51820), vec![&[4u8, 0, 0, 0][..]]);
        assert!(udp_payloads(&pcap, 53).is_empty());
        // The file header alone (which holds 4, 0 too) has no packet.
        assert!(udp_payloads(&pcap[..24], 51820).is_empty());
    }

    #[test]
    fn a_ping_loses_only_what_a_later_reply_proves_lost() {
        let text = "PING 10.42.0.2 (10.42.0.2) 56(84) bytes of data.\n\
            64 bytes from 10.42.0.2: icmp_seq=1 ttl=64 time=0.5 ms\n\
            64 bytes from 10.42.0.2: icmp_seq=3 ttl=64 time=0.5 ms\n\
            64 bytes from 10.42.0.2: icmp_seq=3 ttl=64 time=0.6 ms (DUP!)\n\
            64 bytes from 10.42.0.2: icmp_seq=4 ttl=64 time=0.5 ms\n\n\
            --- 10.42.0.2 ping statistics ---\n5 packets transmitted, 3 received, 40% packet loss, time 400ms\n";
        assert_eq!(Losses::parse(text).unwrap(), Losses { last_answered: 4, sent: 5, lost: vec![2] });
        let silent = "--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n";
        assert_eq!(Losses::parse(silent).unwrap(), Losses { last_answered: 0, sent: 3, lost: vec![] });
    }

    #[test]
    fn reads_all_reachable_from_connected_messages() {
        assert_eq!(all_reachable("2 of 2 peers reachable through the tunnel"), Some(2));
        assert_eq!(all_reachable("12 of 12 peers reachable"), Some(12));
        assert_eq!(all_reachable("2 of 3 peers reachable; not reachable: x (no handshake)"), None);
        assert_eq!(all_reachable("no other node is in the mesh yet"), None);
    }
}

/// What `dig` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigAnswer {
    /// The response code: NOERROR, NXDOMAIN, REFUSED, ...
    pub status: String,
    /// Whether the answer is authoritative.
    pub authoritative: bool,
    /// The A records of the answer section.
    pub addresses: Vec<Ipv4Addr>,
}

impl Mesh {
    /// Asks the DNS server at `server` (port 53) for the A record of `name`, from `node`, over
    /// UDP or TCP.
    pub fn dig(&self, node: &str, server: Ipv4Addr, name: &str, tcp: bool) -> anyhow::Result<DigAnswer> {
        let server = format!("@{server}");
        let mut args = vec!["dig", server.as_str(), name, "A", "+time=1", "+tries=2", "+nocookie"];
        if tcp {
            args.push("+tcp");
        }
        let out = self.nodes.exec_ok(node, &args)?;
        DigAnswer::parse(&out).with_context(|| format!("dig on {node}: {out}"))
    }
}

impl DigAnswer {
    /// Parses dig's default output.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let status = text
            .lines()
            .find_map(|l| l.split("status: ").nth(1))
            .and_then(|s| s.split(',').next())
            .context("no status in dig's output")?
            .to_owned();
        let authoritative = text
            .lines()
            .find_map(|l| l.strip_prefix(";; flags: "))
            .is_some_and(|f| f.split(';').next().unwrap_or_default().split_whitespace().any(|w| w == "aa"));
        let addresses = text
            .lines()
            .filter(|l| !l.starts_with(';'))
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                match fields[..] {
                    [_, _, "IN", "A", ip] => ip.parse().ok(),
                    _ => None,
                }
            })
            .collect();
        Ok(Self { status, authoritative, addresses })
    }
}

#[cfg(test)]
mod dig_tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let text = ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n;; flags: qr aa rd; QUERY: 1, ANSWER: 1, AUTHORITY: 0\n\n;; ANSWER SECTION:\nweb.default.mesh.local.\t5\tIN\tA\t10.42.0.7\n";
        let answer = DigAnswer::parse(text).unwrap();
        assert_eq!(answer.status, "NOERROR");
        assert!(answer.authoritative);
        assert_eq!(answer.addresses, vec![Ipv4Addr::new(10, 42, 0, 7)]);
        let nx = ";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 2\n;; flags: qr rd; QUERY: 1\n";
        let answer = DigAnswer::parse(nx).unwrap();
        assert_eq!((answer.status.as_str(), answer.authoritative, answer.addresses.len()), ("NXDOMAIN", false, 0));
    }
}

/// Retries `check` every 100 ms until it succeeds or `within` passes; returns how long it took.
pub async fn eventually<F: FnMut() -> anyhow::Result<()>>(within: Duration, mut check: F) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return Ok(start.elapsed()),
            Err(err) if start.elapsed() > within => return Err(err.context(format!("still failing after {within:?}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Retries the async `check` every 100 ms until it succeeds or `within` passes; returns its
/// value.
pub async fn eventually_async<T, F, Fut>(within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(err) if start.elapsed() > within => return Err(err.context(format!("still failing after {within:?}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Deletes pod `name` at once (no grace period) if it exists, and waits (at most 60 s) until it
/// is gone.
pub async fn delete_pod_and_wait(pods: &Api<k8s_openapi::api::core::v1::Pod>, name: &str) -> anyhow::Result<()> {
    let now = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    let _ = pods.delete(name, &now).await;
    eventually_async(Duration::from_secs(60), || async {
        anyhow::ensure!(pods.get_opt(name).await?.is_none(), "pod {name} still exists");
        Ok(())
    })
    .await
}

/// Waits (at most 30 s) until the MeshService `name` has a mesh IP, and returns it.
pub async fn wait_mesh_ip(api: &Api<mesh_api::MeshService>, name: &str) -> anyhow::Result<Ipv4Addr> {
    let start = Instant::now();
    loop {
        if let Some(ip) = api.get(name).await?.status.and_then(|s| s.mesh_ip) {
            return Ok(ip.parse()?);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("MeshService {name} got no mesh IP within 30 s (is mesh-controller running?)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Mesh {
    /// Starts a TCP server on `node` that answers every connection with `reply`, on all its
    /// addresses, for at most 90 s (kill it when done).
    pub fn serve_tcp(&self, node: &str, port: u16, reply: &str) -> anyhow::Result<std::process::Child> {
        self.nodes.spawn(
            node,
            &["timeout", "90", "socat", &format!("TCP-LISTEN:{port},reuseaddr,fork"), &format!("SYSTEM:echo {reply}")],
        )
    }

    /// Connects from `node` to `ip:port` and returns what the server said (`None`: no
    /// connection within 2 s).
    pub fn fetch(&self, node: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<Option<String>> {
        self.fetch_from(node, None, ip, port)
    }

    /// As [`Mesh::fetch`], from the source address `source` when given (the node must have it,
    /// or an address routed through it).
    pub fn fetch_from(
        &self,
        node: &str,
        source: Option<Ipv4Addr>,
        ip: Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<Option<String>> {
        let bind = source.map(|s| format!(",bind={s}")).unwrap_or_default();
        let out = self
            .nodes
            .exec(node, &["socat", "-T", "2", "-u", &format!("TCP:{ip}:{port},connect-timeout=2{bind}"), "-"])?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((out.status.success() && !text.is_empty()).then_some(text))
    }
}

/// One WireGuard peer, as a device has it or as the directory wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    /// Its endpoint (`ip:port`), if any.
    pub endpoint: Option<String>,
    /// Its allowed IPs (`a.b.c.d/32`), sorted.
    pub allowed_ips: std::collections::BTreeSet<String>,
}

/// Parses `wg show INTERFACE dump`: public key (base64) → peer. The first line (the interface's
/// own keys and port) is skipped.
pub fn parse_wg_dump(text: &str) -> anyhow::Result<BTreeMap<String, WgPeer>> {
    let mut peers = BTreeMap::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [key, _psk, endpoint, allowed, ..] = fields[..] else { bail!("unexpected wg dump line {line:?}") };
        let none = |v: &str| v == "(none)" || v.is_empty();
        peers.insert(
            key.to_owned(),
            WgPeer {
                endpoint: (!none(endpoint)).then(|| endpoint.to_owned()),
                allowed_ips: if none(allowed) {
                    Default::default()
                } else {
                    allowed.split(',').map(str::to_owned).collect()
                },
            },
        );
    }
    Ok(peers)
}

impl Mesh {
    /// The peers on `node`'s `wg-harness`, from `wg show wg-harness dump`.
    pub fn wg_dump(&self, node: &str) -> anyhow::Result<BTreeMap<String, WgPeer>> {
        parse_wg_dump(&self.nodes.exec_ok(node, &["wg", "show", "wg-harness", "dump"]).context("wg show dump")?)
    }

    /// The peers the directory asks `node` to have: the peer entry the controller published in
    /// every other MeshNode's status (entries with `node`'s own key aside).
    pub async fn desired_peers(&self, node: &str) -> anyhow::Result<BTreeMap<String, WgPeer>> {
        let api: Api<MeshNode> = Api::all(self.cluster.client.clone());
        let all = api.list(&Default::default()).await?;
        let own_key = all
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node))
            .and_then(|n| n.status.as_ref()?.public_key.clone());
        Ok(all
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(node))
            .filter_map(|n| n.status.as_ref()?.peer.clone())
            .filter(|p| Some(&p.public_key) != own_key.as_ref())
            .map(|p| (p.public_key, WgPeer { endpoint: p.endpoint, allowed_ips: p.allowed_ips.into_iter().collect() }))
            .collect())
    }

    /// Fails, naming the differences, unless `node`'s device has exactly the peers the directory
    /// asks for (keys, allowed IPs and endpoints).
    pub async fn check_device_matches_directory(&self, node: &str) -> anyhow::Result<()> {
        let want = self.desired_peers(node).await?;
        let have = self.wg_dump(node)?;
        let mut problems = Vec::new();
        for (key, peer) in &want {
            match have.get(key) {
                None => problems.push(format!("missing peer {key}")),
                Some(got) if got != peer => problems.push(format!("peer {key} is {got:?}, wanted {peer:?}")),
                Some(_) => {}
            }
        }
        for key in have.keys().filter(|k| !want.contains_key(*k)) {
            problems.push(format!("extra peer {key} {:?}", have[key]));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{node}'s device differs from the directory: {}", problems.join("; "))
        }
    }
}

#[cfg(test)]
mod wg_dump_tests {
    use super::*;

    #[test]
    fn parses_wg_show_dump() {
        let text = "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\nQUFB=\t(none)\t192.168.77.2:51820\t10.42.0.1/32,10.42.0.4/32\t1700000000\t10\t20\toff\nQkJC=\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let peers = parse_wg_dump(text).unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers["QUFB="].endpoint.as_deref(), Some("192.168.77.2:51820"));
        assert_eq!(peers["QUFB="].allowed_ips.len(), 2);
        assert_eq!(peers["QkJC="], WgPeer { endpoint: None, allowed_ips: Default::default() });
        assert!(parse_wg_dump("iface\nnot a dump line\n").is_err());
    }
}
