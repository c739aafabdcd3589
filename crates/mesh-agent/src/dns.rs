//! The agent's authoritative DNS server for the mesh zone (`mesh.local`), over UDP and TCP.
//!
//! It serves A records only, from a zone that [`DnsServer::update`] changes while queries are
//! being answered: the new records are visible to the very next query. Answers carry the AA bit
//! and a short TTL ([`TTL`]); a name in the zone without records is NXDOMAIN with the zone's SOA
//! in the authority section (negative answers are cached for [`TTL`] as well), a name that only
//! has names under it (`default.mesh.local` when `db.default.mesh.local` exists) or only other
//! types is NODATA; a name outside the zone is REFUSED, since this server is no resolver.
//! Dynamic updates (RFC 2136) and zone transfers are refused.
//!
//! The zone is the agent's own [`ZoneHandler`]: it answers from the names and addresses the last
//! update gave, held once, and builds the record set a query asks for when it asks. (hickory's
//! in-memory zone held every record set built in advance, about 1.5 KiB a name: 83 MiB of an
//! agent's heap at 55,000 names, and scanned the whole zone for every NXDOMAIN.)
//!
//! What the records are is computed by `mesh_dataplane::dns::zone`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, NS, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, RecordSet, RecordType, TSigResponseContext};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, Catalog, LookupControlFlow, LookupError, LookupOptions, LookupRecords, ZoneHandler,
    ZoneTransfer, ZoneType,
};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The TTL of every record, and of negative answers (the SOA minimum), in seconds: short, so
/// that resolvers and CoreDNS follow a change within seconds.
pub const TTL: u32 = 5;

/// A TCP client that sends no query for this long is disconnected.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Responses queued per TCP connection (hickory's own default).
const TCP_RESPONSE_BUFFER: usize = 32;

/// How many ephemeral ports to try when UDP and TCP must share a port chosen by the kernel.
const EPHEMERAL_TRIES: usize = 20;

/// An authoritative DNS server for one zone, serving until it is shut down or dropped.
pub struct DnsServer {
    zone: Arc<MeshZone>,
    local_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), NetError>>>,
}

/// The zone served: its origin and the records of the last update, shared by the queries
/// (readers) and [`DnsServer::update`] (the writer).
struct MeshZone {
    origin: LowerName,
    state: RwLock<Records>,
}

/// The records as the last update gave them, and how they map onto the names served.
///
/// A name is served under its *key*: the name in lower case, ASCII (`xn--` labels), fully
/// qualified (`db.default.mesh.local.`). The addresses of a key are those of its canonical input
/// name ([`canonical`]: the key less its final dot), if given, and of its aliases.
struct Records {
    /// The input, name for name: what the next update is compared with, and what is served.
    input: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Input names spelled other than canonically (upper case, a trailing dot, escapes), by the
    /// key they make up. A canonically spelled name is its key's own spelling and needs no
    /// entry, so the usual zone costs no index at all.
    aliases: HashMap<String, Vec<String>>,
    /// Input names not applied, and why.
    rejected: BTreeMap<String, String>,
    /// Keys with no address of their own but served names under them (`default.mesh.local.`
    /// under `db.default.mesh.local.`), each with how many: they answer NODATA, not NXDOMAIN.
    interior: HashMap<String, usize>,
    /// The SOA serial: moves whenever an answer would.
    serial: u32,
}

/// Whether `name` is spelled as its key prints, less the final dot: lower-case letters, digits
/// and `-` in non-empty labels (`db.default.mesh.local`), as the zone's own names are.
fn canonical(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| !label.is_empty())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The key a parsed name is served under (see [`Records`]).
fn key_of(name: &Name) -> String {
    let mut key = name.to_lowercase().to_ascii();
    if !key.ends_with('.') {
        key.push('.');
    }
    key
}

impl Records {
    /// The addresses served for `key`: its canonical input name's and its aliases'.
    fn addresses(&self, key: &str) -> BTreeSet<Ipv4Addr> {
        let own = key.strip_suffix('.').filter(|n| canonical(n) && !self.rejected.contains_key(*n));
        let names = own.into_iter().chain(self.aliases.get(key).into_iter().flatten().map(String::as_str));
        names.filter_map(|n| self.input.get(n)).flatten().copied().collect()
    }
}

/// How one name of an update differs from the previous update.
enum Change<'a> {
    Added(&'a str, &'a Vec<Ipv4Addr>),
    Changed(&'a str, &'a Vec<Ipv4Addr>),
    Removed(String),
}

impl Change<'_> {
    fn name(&self) -> &str {
        match self {
            Change::Added(name, _) | Change::Changed(name, _) => name,
            Change::Removed(name) => name,
        }
    }
}

/// The names of `new` that differ from `old`: both are sorted, so one walk of each. Removed
/// names are copied, so that `old` can be changed while the result is applied.
fn diff<'a>(old: &BTreeMap<String, Vec<Ipv4Addr>>, new: &'a BTreeMap<String, Vec<Ipv4Addr>>) -> Vec<Change<'a>> {
    use std::cmp::Ordering;
    let mut changes = Vec::new();
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((o, _)), Some((n, _))) => o.cmp(n),
        };
        match order {
            Ordering::Less => {
                if let Some((name, _)) = old.next() {
                    changes.push(Change::Removed(name.clone()));
                }
            }
            Ordering::Greater => {
                if let Some((name, ips)) = new.next() {
                    changes.push(Change::Added(name, ips));
                }
            }
            Ordering::Equal => {
                if let (Some((_, before)), Some((name, ips))) = (old.next(), new.next())
                    && before != ips
                {
                    changes.push(Change::Changed(name, ips));
                }
            }
        }
    }
    changes
}

/// What [`DnsServer::update`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Updated {
    /// Names whose addresses changed, were added or were removed.
    pub changed: usize,
    /// Names that were not applied, each with the reason (`name: why`).
    pub rejected: Vec<String>,
}

impl DnsServer {
    /// Serves `zone` (e.g. `mesh.local`) on UDP and TCP on each address in `listen`, with no
    /// records but the zone's SOA and NS until the first [`update`](Self::update).
    ///
    /// A port 0 picks one free port for both UDP and TCP on that address (for tests); see
    /// [`local_addrs`](Self::local_addrs).
    pub async fn start(listen: &[SocketAddr], zone: &str) -> anyhow::Result<Self> {
        if listen.is_empty() {
            bail!("no address to serve DNS on: give at least one listen address");
        }
        let mut origin = Name::from_ascii(zone)
            .with_context(|| format!("the DNS zone {zone:?} is not a domain name"))?
            .to_lowercase();
        origin.set_fqdn(true);
        if origin.is_root() {
            bail!("the DNS zone must not be the root: give a zone such as mesh.local");
        }

        // The serial follows the clock so that it grows across restarts too.
        let serial = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32);
        let handler = Arc::new(MeshZone {
            origin: LowerName::new(&origin),
            state: RwLock::new(Records {
                input: BTreeMap::new(),
                aliases: HashMap::new(),
                rejected: BTreeMap::new(),
                interior: HashMap::new(),
                serial,
            }),
        });
        let mut catalog = Catalog::new();
        catalog.upsert(handler.origin.clone(), vec![handler.clone() as Arc<dyn ZoneHandler>]);

        let mut server = Server::new(catalog);
        let mut local_addrs = Vec::with_capacity(listen.len());
        for addr in listen {
            let (udp, tcp) = bind(*addr).await?;
            local_addrs.push(udp.local_addr().with_context(|| format!("local address of the DNS socket {addr}"))?);
            server.register_socket(udp);
            server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        }
        let shutdown = server.shutdown_token().clone();
        let task = tokio::spawn(async move { server.block_until_done().await });
        tracing::info!(zone = %origin, addrs = ?local_addrs, "DNS server listening on UDP and TCP");
        Ok(Self { zone: handler, local_addrs, shutdown, task: Some(task) })
    }

    /// The addresses served (UDP and TCP share each one), with the actual ports.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// False once the server stopped serving (a socket failed, or it was shut down).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Replaces all A records of the zone with `records`: fully qualified names in the zone
    /// (`db.default.mesh.local`, a trailing dot is optional) → addresses. A name with no address
    /// gets no record. The swap is atomic (a query sees the old or the new zone, never a mix)
    /// and visible to the next query; only names whose addresses differ are touched, and the
    /// SOA serial is bumped when something changed. Names outside the zone are not applied and
    /// are reported, in every update that still carries them.
    ///
    /// Cost: one comparison of `records` with the previous update's, then work only for the
    /// names that differ (a sync that changes one service of 50,000 parses one name, not 50,000).
    pub fn update(&self, records: &BTreeMap<String, Vec<Ipv4Addr>>) -> Updated {
        let mut state = self.zone.state.write().unwrap_or_else(PoisonError::into_inner);
        let changes = diff(&state.input, records);

        // The keys the differing names make up, and what each served before.
        let mut touched: HashMap<String, (Name, BTreeSet<Ipv4Addr>)> = HashMap::new();
        for change in &changes {
            if let Ok(parsed) = self.zone.record_name(change.name()) {
                let key = key_of(&parsed);
                if let std::collections::hash_map::Entry::Vacant(entry) = touched.entry(key) {
                    let before = state.addresses(entry.key());
                    entry.insert((parsed, before));
                }
            }
        }

        let Records { input, aliases, rejected, .. } = &mut *state;
        for change in changes {
            match change {
                Change::Removed(name) => {
                    if rejected.remove(&name).is_none()
                        && !canonical(&name)
                        && let Ok(parsed) = self.zone.record_name(&name)
                    {
                        let key = key_of(&parsed);
                        if let Some(names) = aliases.get_mut(&key) {
                            names.retain(|n| *n != name);
                            if names.is_empty() {
                                aliases.remove(&key);
                            }
                        }
                    }
                    input.remove(&name);
                }
                // Same name, so the same key (or the same rejection): only its addresses moved.
                Change::Changed(name, ips) => {
                    input.insert(name.to_owned(), ips.clone());
                }
                Change::Added(name, ips) => {
                    match self.zone.record_name(name) {
                        Ok(parsed) if !canonical(name) => {
                            aliases.entry(key_of(&parsed)).or_default().push(name.to_owned())
                        }
                        Ok(_) => {}
                        Err(why) => {
                            rejected.insert(name.to_owned(), why);
                        }
                    }
                    input.insert(name.to_owned(), ips.clone());
                }
            }
        }

        let mut out = Updated {
            changed: 0,
            rejected: state.rejected.iter().map(|(name, why)| format!("{name}: {why}")).collect(),
        };
        for (key, (parsed, before)) in touched {
            let after = state.addresses(&key);
            if after == before {
                continue;
            }
            out.changed += 1;
            if before.is_empty() != after.is_empty() {
                state.count_interior(&parsed, &self.zone.origin, !after.is_empty());
            }
        }
        if out.changed > 0 {
            state.serial = state.serial.wrapping_add(1);
        }
        drop(state);
        if !out.rejected.is_empty() {
            tracing::warn!(rejected = ?out.rejected, "DNS records not applied");
        }
        out
    }

    /// Stops serving and waits until every socket is closed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.context("the DNS server task panicked")?.context("the DNS server failed")?;
        }
        Ok(())
    }
}

impl Records {
    /// Counts `name` (`served`) or uncounts it in each name between it and the zone's origin.
    fn count_interior(&mut self, name: &Name, origin: &LowerName, served: bool) {
        let mut above = name.base_name();
        while above.num_labels() > origin.num_labels() {
            let key = key_of(&above);
            if served {
                *self.interior.entry(key).or_default() += 1;
            } else if let Some(count) = self.interior.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.interior.remove(&key);
                }
            }
            above = above.base_name();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl MeshZone {
    /// `name` as a record's name under the zone, or why it cannot be one.
    fn record_name(&self, name: &str) -> Result<Name, String> {
        let mut parsed = Name::from_ascii(name).map_err(|e| format!("not a domain name: {e}"))?;
        parsed.set_fqdn(true);
        if parsed.is_wildcard() {
            return Err("wildcards are not served".into());
        }
        let lower = LowerName::new(&parsed);
        if lower.num_labels() <= self.origin.num_labels() || !self.origin.zone_of(&lower) {
            return Err(format!("not a name under the zone {}", self.origin));
        }
        Ok(parsed)
    }

    /// The answer to `name` and `rtype`: a record set, or the error that makes the response
    /// NODATA (`NameExists`), NXDOMAIN or REFUSED.
    fn answer(&self, name: &LowerName, rtype: RecordType) -> Result<Arc<RecordSet>, LookupError> {
        if !self.origin.zone_of(name) {
            return Err(LookupError::from(ResponseCode::Refused));
        }
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let origin = Name::from(self.origin.clone());
        if *name == self.origin {
            return match rtype {
                RecordType::SOA => Ok(Arc::new(soa_set(&origin, state.serial))),
                RecordType::NS | RecordType::ANY => {
                    let mut ns = RecordSet::with_ttl(origin.clone(), RecordType::NS, TTL);
                    ns.add_rdata(RData::NS(NS(origin)));
                    Ok(Arc::new(ns))
                }
                _ => Err(LookupError::NameExists),
            };
        }
        let name = Name::from(name.clone());
        let key = key_of(&name);
        let addresses = state.addresses(&key);
        if addresses.is_empty() {
            return Err(if state.interior.contains_key(&key) {
                LookupError::NameExists
            } else {
                LookupError::from(ResponseCode::NXDomain)
            });
        }
        if !matches!(rtype, RecordType::A | RecordType::ANY) {
            return Err(LookupError::NameExists);
        }
        let mut set = RecordSet::with_ttl(name, RecordType::A, TTL);
        for ip in addresses {
            set.add_rdata(RData::A(A(ip)));
        }
        Ok(Arc::new(set))
    }
}

#[async_trait::async_trait]
impl ZoneHandler for MeshZone {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        if rtype == RecordType::AXFR {
            return LookupControlFlow::Break(Err(LookupError::from(ResponseCode::Refused)));
        }
        LookupControlFlow::Continue(
            self.answer(name, rtype).map(|set| AuthLookup::answers(LookupRecords::new(lookup_options, set), None)),
        )
    }

    async fn search(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let info = match request.request_info() {
            Ok(info) => info,
            Err(e) => return (LookupControlFlow::Break(Err(e)), None),
        };
        (self.lookup(info.query.name(), info.query.query_type(), Some(&info), lookup_options).await, None)
    }

    async fn nsec_records(&self, _name: &LowerName, _lookup_options: LookupOptions) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Continue(Ok(AuthLookup::default()))
    }

    async fn zone_transfer(
        &self,
        _request: &Request,
        _lookup_options: LookupOptions,
        _now: u64,
    ) -> Option<(Result<ZoneTransfer, LookupError>, Option<TSigResponseContext>)> {
        Some((Err(LookupError::from(ResponseCode::Refused)), None))
    }
}

/// Binds UDP and TCP on `addr`; with port 0, on one free port for both.
async fn bind(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let hint =
        "is that address on an interface of this host, and may the agent bind port 53 (root or CAP_NET_BIND_SERVICE)?";
    if addr.port() != 0 {
        let udp = UdpSocket::bind(addr).await.with_context(|| format!("cannot serve DNS on UDP {addr}: {hint}"))?;
        let tcp = TcpListener::bind(addr).await.with_context(|| format!("cannot serve DNS on TCP {addr}: {hint}"))?;
        return Ok((udp, tcp));
    }
    for _ in 0..EPHEMERAL_TRIES {
        let udp = UdpSocket::bind(addr).await.with_context(|| format!("cannot serve DNS on UDP {addr}: {hint}"))?;
        let port = udp.local_addr().with_context(|| format!("local address of the DNS socket {addr}"))?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot serve DNS on TCP {}:{port}: {hint}", addr.ip())),
        }
    }
    bail!("found no port free for both UDP and TCP on {} after {EPHEMERAL_TRIES} tries", addr.ip())
}

/// The zone's SOA record set with `serial`. The nameserver named is the apex itself: any other
/// name under the zone could be a service's or a node's.
fn soa_set(origin: &Name, serial: u32) -> RecordSet {
    let hostmaster =
        Name::from_ascii("hostmaster").and_then(|h| h.append_domain(origin)).unwrap_or_else(|_| origin.clone());
    let mut soa = RecordSet::with_ttl(origin.clone(), RecordType::SOA, TTL);
    soa.add_rdata(RData::SOA(SOA::new(origin.clone(), hostmaster, serial, 60, 10, 3600, TTL)));
    soa
}

#[cfg(test)]
mod tests {
    use hickory_server::proto::op::{Message, Query, ResponseCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut msg = Message::query();
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        msg
    }

    async fn udp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let q = query(name, rtype);
        socket.send_to(&q.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (len, _) = timeout(WAIT, socket.recv_from(&mut buf)).await.expect("no UDP answer in time").unwrap();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(answer.metadata.id, q.metadata.id);
        answer
    }

    async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let q = query(name, rtype).to_vec().unwrap();
        let exchange = async {
            let mut stream = TcpStream::connect(server).await.unwrap();
            stream.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            stream.write_all(&q).await.unwrap();
            let len = stream.read_u16().await.unwrap();
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.unwrap();
            Message::from_vec(&buf).unwrap()
        };
        timeout(WAIT, exchange).await.expect("no TCP answer in time")
    }

    fn a_records(msg: &Message) -> Vec<Ipv4Addr> {
        msg.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn records(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<Ipv4Addr>> {
        entries.iter().map(|(n, ips)| (n.to_string(), ips.iter().map(|ip| ip.parse().unwrap()).collect())).collect()
    }

    async fn server() -> DnsServer {
        let server = timeout(WAIT, DnsServer::start(&["127.0.0.1:0".parse().unwrap()], "mesh.local"))
            .await
            .expect("start in time")
            .unwrap();
        let updated = server.update(&records(&[
            ("db.default.mesh.local", &["10.42.1.5"]),
            ("db.mesh.local.", &["10.42.1.5"]),
            ("w1.node.mesh.local", &["10.42.0.1"]),
        ]));
        assert_eq!(updated, Updated { changed: 3, rejected: vec![] });
        server
    }

    #[tokio::test]
    async fn answers_authoritatively_with_a_short_ttl() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        let answer = udp(addr, "db.default.mesh.local.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative, "AA bit");
        assert_eq!(a_records(&answer), [Ipv4Addr::new(10, 42, 1, 5)]);
        assert_eq!(answer.answers[0].ttl, TTL);
        // Case does not matter.
        assert_eq!(a_records(&udp(addr, "W1.Node.Mesh.Local.", RecordType::A).await), [Ipv4Addr::new(10, 42, 0, 1)]);
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_names_are_nxdomain_with_the_soa() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        let answer = udp(addr, "nope.default.mesh.local.", RecordType::A).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
        assert!(answer.metadata.authoritative);
        assert!(answer.answers.is_empty());
        assert!(
            answer.authorities.iter().any(|r| matches!(&r.data, RData::SOA(soa) if soa.minimum == TTL)),
            "{:?}",
            answer.authorities
        );
        // A name that exists, with another type: NOERROR without answers (NODATA).
        let nodata = udp(addr, "db.default.mesh.local.", RecordType::AAAA).await;
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        // A name with names below it but no records of its own (`node.mesh.local`): NODATA too.
        let empty = udp(addr, "node.mesh.local.", RecordType::A).await;
        assert_eq!(empty.metadata.response_code, ResponseCode::NoError);
        assert!(empty.answers.is_empty());
        // The apex answers SOA.
        let soa = udp(addr, "mesh.local.", RecordType::SOA).await;
        assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
        assert!(matches!(soa.answers.first().map(|r| &r.data), Some(RData::SOA(_))), "{soa:?}");
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn names_outside_the_zone_are_refused() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        for name in ["example.com.", "local.", "mesh.localx."] {
            let answer = udp(addr, name, RecordType::A).await;
            assert_eq!(answer.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(answer.answers.is_empty());
        }
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn an_update_is_visible_to_the_next_query() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        let serial = |m: &Message| match m.answers.first().map(|r| &r.data) {
            Some(RData::SOA(soa)) => soa.serial,
            other => panic!("no SOA: {other:?}"),
        };
        let serial_before = serial(&udp(addr, "mesh.local.", RecordType::SOA).await);

        let updated = server.update(&records(&[
            ("db.default.mesh.local", &["10.42.1.6", "10.42.1.7"]),
            ("db.mesh.local.", &["10.42.1.5"]),
            ("web.default.mesh.local", &["192.0.2.1"]),
            ("gone.default.mesh.local", &[]),
            ("example.com", &["192.0.2.2"]),
            ("mesh.local", &["192.0.2.3"]),
        ]));
        // db changed, web added, w1.node removed; db.mesh.local untouched.
        assert_eq!(updated.changed, 3, "{updated:?}");
        assert_eq!(updated.rejected.len(), 2, "{updated:?}");
        assert!(updated.rejected[0].starts_with("example.com: not a name under the zone mesh.local."));

        let db = udp(addr, "db.default.mesh.local.", RecordType::A).await;
        assert_eq!(a_records(&db), [Ipv4Addr::new(10, 42, 1, 6), Ipv4Addr::new(10, 42, 1, 7)]);
        assert_eq!(
            a_records(&udp(addr, "web.default.mesh.local.", RecordType::A).await),
            [Ipv4Addr::new(192, 0, 2, 1)]
        );
        let gone = udp(addr, "w1.node.mesh.local.", RecordType::A).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(a_records(&udp(addr, "db.mesh.local.", RecordType::A).await), [Ipv4Addr::new(10, 42, 1, 5)]);
        assert_eq!(serial(&udp(addr, "mesh.local.", RecordType::SOA).await), serial_before.wrapping_add(1));

        // The same records again change nothing.
        let again = server.update(&records(&[
            ("db.default.mesh.local", &["10.42.1.7", "10.42.1.6"]),
            ("db.mesh.local.", &["10.42.1.5"]),
            ("web.default.mesh.local", &["192.0.2.1"]),
        ]));
        assert_eq!(again, Updated::default());
        assert_eq!(serial(&udp(addr, "mesh.local.", RecordType::SOA).await), serial_before.wrapping_add(1));
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn tcp_works_too() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        let answer = tcp(addr, "db.mesh.local.", RecordType::A).await;
        assert!(answer.metadata.authoritative);
        assert_eq!(a_records(&answer), [Ipv4Addr::new(10, 42, 1, 5)]);
        assert_eq!(tcp(addr, "nope.mesh.local.", RecordType::A).await.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(tcp(addr, "example.com.", RecordType::A).await.metadata.response_code, ResponseCode::Refused);
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn several_addresses_and_a_clean_shutdown() {
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:0".parse().unwrap(), "127.0.0.2:0".parse().unwrap()];
        let server = timeout(WAIT, DnsServer::start(&listen, "mesh.local.")).await.unwrap().unwrap();
        server.update(&records(&[("a.b.mesh.local", &["10.42.1.1"])]));
        let addrs = server.local_addrs().to_vec();
        assert_eq!(addrs.len(), 2);
        for addr in &addrs {
            assert_eq!(a_records(&udp(*addr, "a.b.mesh.local.", RecordType::A).await), [Ipv4Addr::new(10, 42, 1, 1)]);
            assert_eq!(a_records(&tcp(*addr, "a.b.mesh.local.", RecordType::A).await), [Ipv4Addr::new(10, 42, 1, 1)]);
        }
        assert!(server.is_running());
        timeout(WAIT, server.shutdown()).await.expect("shutdown in time").unwrap();
        // The ports are free again.
        for addr in addrs {
            UdpSocket::bind(addr).await.unwrap();
            TcpListener::bind(addr).await.unwrap();
        }
    }

    #[tokio::test]
    async fn bad_arguments_say_what_to_do() {
        let err = DnsServer::start(&[], "mesh.local").await.err().unwrap();
        assert!(err.to_string().contains("at least one listen address"), "{err:#}");
        let err = DnsServer::start(&["127.0.0.1:0".parse().unwrap()], ".").await.err().unwrap();
        assert!(err.to_string().contains("must not be the root"), "{err:#}");
    }

    /// A runtime with worker threads for the fuzz targets below, which drive the server from
    /// proptest's synchronous runner.
    fn fuzz_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    /// Fuzz target: datagrams and TCP messages from the network — arbitrary bytes, and real
    /// queries with random bytes changed and cut short — never stop the server or change what
    /// it serves: after each one, a real query is answered as before. `PROPTEST_CASES` sets the
    /// number of cases (`make fuzz`).
    #[test]
    fn fuzz_dns_server_survives_arbitrary_queries() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let rt = fuzz_runtime();
        let server = rt.block_on(server());
        let addr = server.local_addrs()[0];
        let sender = rt.block_on(UdpSocket::bind("127.0.0.1:0")).unwrap();
        let valid = query("db.default.mesh.local.", RecordType::A).to_vec().unwrap();
        let damaged = (
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            any::<prop::sample::Index>(),
        )
            .prop_map(move |(flips, cut)| {
                let mut q = valid.clone();
                for (at, byte) in flips {
                    let i = at.index(q.len());
                    q[i] = byte;
                }
                q.truncate(cut.index(q.len() + 1).max(1));
                q
            });
        let message = prop_oneof![proptest::collection::vec(any::<u8>(), 0..600), damaged];
        let mut runner = TestRunner::new(Config::default());
        runner
            .run(&(message, any::<bool>()), |(bytes, over_tcp)| {
                rt.block_on(async {
                    if over_tcp {
                        if let Ok(Ok(mut stream)) = timeout(WAIT, TcpStream::connect(addr)).await {
                            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&bytes);
                            let _ = timeout(WAIT, stream.write_all(&framed)).await;
                        }
                    } else {
                        let _ = sender.send_to(&bytes, addr).await;
                    }
                    let answer = udp(addr, "db.default.mesh.local.", RecordType::A).await;
                    prop_assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
                    prop_assert_eq!(a_records(&answer), [Ipv4Addr::new(10, 42, 1, 5)]);
                    Ok(())
                })
            })
            .unwrap();
        assert!(server.is_running());
        rt.block_on(server.shutdown()).unwrap();
    }

    /// Every A record the zone serves, as a query would see it: each name given that the zone
    /// took, asked for through the zone's own answer.
    fn served(server: &DnsServer) -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
        let keys: BTreeSet<(String, LowerName)> = {
            let state = server.zone.state.read().unwrap();
            state
                .input
                .keys()
                .filter_map(|name| server.zone.record_name(name).ok())
                .map(|parsed| (key_of(&parsed), LowerName::new(&parsed)))
                .collect()
        };
        keys.into_iter()
            .filter_map(|(key, name)| {
                let set = server.zone.answer(&name, RecordType::A).ok()?;
                let ips = set
                    .records_without_rrsigs()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                Some((key, ips))
            })
            .collect()
    }

    /// An internationalised name is served under its ASCII (`xn--`) spelling, the one queries
    /// carry; hickory prints names in Unicode, so a key made by printing would never match.
    #[tokio::test]
    async fn punycode_names_are_served() {
        let server = server().await;
        let addr = server.local_addrs()[0];
        let updated = server.update(&records(&[("xn--bcher-kva.default.mesh.local", &["10.42.1.9"])]));
        assert_eq!(updated, Updated { changed: 4, rejected: vec![] }, "one added, the server()'s three removed");
        let answer = udp(addr, "xn--bcher-kva.default.mesh.local.", RecordType::A).await;
        assert_eq!(a_records(&answer), [Ipv4Addr::new(10, 42, 1, 9)]);
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn names_that_share_a_record_keep_it_until_the_last_one_goes() {
        let server = server().await;
        let both = records(&[("db.mesh.local", &["10.42.1.5"]), ("DB.mesh.local.", &["10.42.1.6"])]);
        assert_eq!(server.update(&both).changed, 3, "db.mesh.local merged, two others removed");
        let db = "db.mesh.local.".to_owned();
        let two = BTreeSet::from([Ipv4Addr::new(10, 42, 1, 5), Ipv4Addr::new(10, 42, 1, 6)]);
        assert_eq!(served(&server), BTreeMap::from([(db.clone(), two)]));
        let one = records(&[("DB.mesh.local.", &["10.42.1.6"])]);
        assert_eq!(server.update(&one).changed, 1);
        assert_eq!(served(&server), BTreeMap::from([(db, BTreeSet::from([Ipv4Addr::new(10, 42, 1, 6)]))]));
        assert_eq!(server.update(&BTreeMap::new()).changed, 1);
        assert!(served(&server).is_empty());
        server.shutdown().await.unwrap();
    }

    /// Property: a run of updates leaves the zone exactly as the last records say, as does one
    /// update with them on a fresh server (applying only the differences loses and keeps
    /// nothing extra), and both report the same rejections.
    #[test]
    fn updates_applied_one_after_another_equal_the_last_one_applied_afresh() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let rt = fuzz_runtime();
        let name = prop_oneof![
            "[a-c]{1,2}\\.(mesh|MESH)\\.local\\.?",
            "[a-c]\\.[a-b]\\.mesh\\.local",
            Just("example.com".to_owned()),
            Just("*.mesh.local".to_owned()),
        ];
        let update = proptest::collection::btree_map(name, proptest::collection::vec(0u8..4, 0..3), 0..6);
        let updates = proptest::collection::vec(update, 1..6);
        let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
        runner
            .run(&updates, |updates| {
                let as_records = |u: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<Ipv4Addr>> {
                    u.iter()
                        .map(|(n, ips)| (n.clone(), ips.iter().map(|i| Ipv4Addr::new(10, 42, 9, *i)).collect()))
                        .collect()
                };
                let incremental =
                    rt.block_on(DnsServer::start(&["127.0.0.1:0".parse().unwrap()], "mesh.local")).unwrap();
                let mut last = Updated::default();
                for update in &updates {
                    last = incremental.update(&as_records(update));
                }
                let fresh = rt.block_on(DnsServer::start(&["127.0.0.1:0".parse().unwrap()], "mesh.local")).unwrap();
                let once = fresh.update(&as_records(updates.last().unwrap()));
                // What the last records mean, worked out by hand for these names: case and a
                // final dot do not matter, example.com and the wildcard are refused.
                let mut expected: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
                for (name, ips) in as_records(updates.last().unwrap()) {
                    if name != "example.com" && !name.starts_with('*') {
                        let key = format!("{}.", name.to_lowercase().trim_end_matches('.'));
                        expected.entry(key).or_default().extend(ips);
                    }
                }
                expected.retain(|_, ips| !ips.is_empty());
                // And which names only have names under them (NODATA rather than NXDOMAIN).
                let kind = |server: &DnsServer, name: &str| {
                    let name = LowerName::new(&Name::from_ascii(name).unwrap());
                    match server.zone.answer(&name, RecordType::A) {
                        Ok(_) => "records",
                        Err(LookupError::NameExists) => "nodata",
                        Err(_) => "nxdomain",
                    }
                };
                for name in ["a.mesh.local.", "b.mesh.local.", "c.mesh.local.", "a.a.mesh.local.", "x.mesh.local."] {
                    let want = if expected.contains_key(name) {
                        "records"
                    } else if expected.keys().any(|k| k.ends_with(&format!(".{name}"))) {
                        "nodata"
                    } else {
                        "nxdomain"
                    };
                    prop_assert_eq!(kind(&fresh, name), want, "{} afresh", name);
                    prop_assert_eq!(kind(&incremental, name), want, "{} after each update", name);
                }
                prop_assert_eq!(served(&fresh), expected.clone());
                prop_assert_eq!(served(&incremental), expected);
                prop_assert_eq!(last.rejected, once.rejected);
                rt.block_on(incremental.shutdown()).unwrap();
                rt.block_on(fresh.shutdown()).unwrap();
                Ok(())
            })
            .unwrap();
    }

    /// Fuzz target: record names of any shape (they come from MeshService and MeshNode names)
    /// are served or reported, never a panic, and the zone's own records stay.
    #[test]
    fn fuzz_dns_update_with_arbitrary_names() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let rt = fuzz_runtime();
        let server = rt.block_on(server());
        let addr = server.local_addrs()[0];
        let name = prop_oneof![
            any::<String>(),
            "[a-z0-9.*_-]{0,70}\\.mesh\\.local\\.?",
            "([a-z0-9-]{0,64}\\.){0,5}mesh\\.local",
        ];
        let records = proptest::collection::btree_map(name, proptest::collection::vec(any::<[u8; 4]>(), 0..3), 0..6);
        let mut runner = TestRunner::new(Config::default());
        runner
            .run(&records, |records| {
                let records: BTreeMap<String, Vec<Ipv4Addr>> =
                    records.into_iter().map(|(n, ips)| (n, ips.into_iter().map(Ipv4Addr::from).collect())).collect();
                let updated = server.update(&records);
                prop_assert!(updated.rejected.len() <= records.len());
                for rejected in &updated.rejected {
                    prop_assert!(records.keys().any(|n| rejected.starts_with(&format!("{n}: "))), "{}", rejected);
                }
                let soa = rt.block_on(udp(addr, "mesh.local.", RecordType::SOA));
                prop_assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
                Ok(())
            })
            .unwrap();
        rt.block_on(server.shutdown()).unwrap();
    }
}
