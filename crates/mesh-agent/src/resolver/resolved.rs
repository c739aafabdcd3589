//! `--resolver resolved`: split DNS for the zone through systemd-resolved's D-Bus API
//! (`org.freedesktop.resolve1.Manager` on the system bus), as `resolvectl dns wg-harness IP` and
//! `resolvectl domain wg-harness ~mesh.local` would do: the agent's own DNS server (on the node's
//! mesh IP) becomes the WireGuard link's DNS server, and `~mesh.local` a routing-only domain of
//! that link, so only names in the zone go there and the link never becomes the default route
//! for other names.
//!
//! resolved forgets a link's settings when the link goes; the agent applies them again whenever
//! the link's index or the server address changed, and on every full resync (a restarted
//! resolved forgets them too). On exit it reverts the link (`RevertLink`).

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;

/// The name systemd-resolved owns on the system bus.
pub const SERVICE: &str = "org.freedesktop.resolve1";

/// Address family of an IPv4 server in `SetLinkDNS` (AF_INET).
const AF_INET: i32 = 2;

/// The calls the agent makes, as systemd-resolved declares them.
#[zbus::proxy(
    interface = "org.freedesktop.resolve1.Manager",
    default_service = "org.freedesktop.resolve1",
    default_path = "/org/freedesktop/resolve1",
    gen_blocking = false
)]
pub trait Manager {
    /// `SetLinkDNS(i ifindex, a(iay) addresses)`.
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addresses: &[(i32, Vec<u8>)]) -> zbus::Result<()>;
    /// `SetLinkDomains(i ifindex, a(sb) domains)`: true marks a routing-only domain (`~zone`).
    #[zbus(name = "SetLinkDomains")]
    fn set_link_domains(&self, ifindex: i32, domains: &[(&str, bool)]) -> zbus::Result<()>;
    /// `RevertLink(i ifindex)`: drops everything set on the link.
    #[zbus(name = "RevertLink")]
    fn revert_link(&self, ifindex: i32) -> zbus::Result<()>;
}

/// Bound on every call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of systemd-resolved on one bus connection.
pub struct Resolved {
    manager: ManagerProxy<'static>,
    zone: String,
    /// What was applied last: (ifindex, server).
    applied: Option<(u32, Ipv4Addr)>,
}

impl Resolved {
    /// A client on `connection` (the system bus; tests give another).
    pub async fn new(connection: &zbus::Connection, zone: &str) -> anyhow::Result<Self> {
        let manager = ManagerProxy::new(connection).await.context("making a proxy for org.freedesktop.resolve1")?;
        Ok(Self { manager, zone: zone.to_owned(), applied: None })
    }

    /// Points link `ifindex` at `server` for the zone; only when either changed, or `again`.
    /// Returns whether it called resolved.
    pub async fn apply(&mut self, ifindex: u32, server: Ipv4Addr, again: bool) -> anyhow::Result<bool> {
        if !again && self.applied == Some((ifindex, server)) {
            return Ok(false);
        }
        let index = i32::try_from(ifindex).context("interface index out of range")?;
        let calls = async {
            self.manager.set_link_dns(index, &[(AF_INET, server.octets().to_vec())]).await?;
            self.manager.set_link_domains(index, &[(self.zone.as_str(), true)]).await
        };
        tokio::time::timeout(CALL_TIMEOUT, calls)
            .await
            .context("systemd-resolved did not answer within 5 s")?
            .with_context(|| {
                format!(
                    "systemd-resolved refused SetLinkDNS/SetLinkDomains for link {ifindex} (is the agent root, or \
                     allowed by polkit? else use --resolver hosts)"
                )
            })?;
        self.applied = Some((ifindex, server));
        Ok(true)
    }

    /// Reverts the link the settings went to, if any; false when nothing was applied.
    pub async fn revert(&mut self) -> anyhow::Result<bool> {
        let Some((ifindex, _)) = self.applied.take() else { return Ok(false) };
        let index = i32::try_from(ifindex).context("interface index out of range")?;
        tokio::time::timeout(CALL_TIMEOUT, self.manager.revert_link(index))
            .await
            .context("systemd-resolved did not answer within 5 s")?
            .with_context(|| format!("systemd-resolved refused RevertLink for link {ifindex}"))?;
        Ok(true)
    }
}

/// Whether systemd-resolved answers on `connection`: its name has an owner, or the bus can
/// start it.
pub async fn available(connection: &zbus::Connection) -> bool {
    let check = async {
        let bus = zbus::fdo::DBusProxy::new(connection).await?;
        let name = zbus::names::BusName::try_from(SERVICE)?;
        if bus.name_has_owner(name).await? {
            return Ok::<bool, anyhow::Error>(true);
        }
        Ok(bus.list_activatable_names().await?.iter().any(|n| n.as_str() == SERVICE))
    };
    matches!(tokio::time::timeout(CALL_TIMEOUT, check).await, Ok(Ok(true)))
}

/// The system bus, within 5 s.
pub async fn system_bus() -> anyhow::Result<zbus::Connection> {
    tokio::time::timeout(CALL_TIMEOUT, zbus::Connection::system())
        .await
        .context("connecting to the system bus timed out")?
        .context("connecting to the D-Bus system bus (/run/dbus/system_bus_socket)")
}

#[cfg(test)]
mod tests {
    //! Against a real bus: a private `dbus-daemon --session`, where a stub (written here with
    //! zbus) owns org.freedesktop.resolve1 and records the calls. Not a real systemd-resolved.

    use std::sync::{Arc, Mutex};

    use super::*;

    /// The stub: the three methods, recorded as text.
    struct Stub {
        calls: Arc<Mutex<Vec<String>>>,
    }

    #[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
    impl Stub {
        #[zbus(name = "SetLinkDNS")]
        fn set_link_dns(&self, ifindex: i32, addresses: Vec<(i32, Vec<u8>)>) {
            self.calls.lock().unwrap().push(format!("SetLinkDNS {ifindex} {addresses:?}"));
        }
        #[zbus(name = "SetLinkDomains")]
        fn set_link_domains(&self, ifindex: i32, domains: Vec<(String, bool)>) {
            self.calls.lock().unwrap().push(format!("SetLinkDomains {ifindex} {domains:?}"));
        }
        #[zbus(name = "RevertLink")]
        fn revert_link(&self, ifindex: i32) {
            self.calls.lock().unwrap().push(format!("RevertLink {ifindex}"));
        }
    }

    /// A session bus of its own, killed on drop.
    struct Bus {
        daemon: std::process::Child,
        address: String,
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }

    fn start_bus() -> Bus {
        use std::io::BufRead;
        let mut daemon = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(std::process::Stdio::piped())
            // It warns that it may not raise its fd limit (not root-owned limits): noise here.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon runs (Debian package dbus-daemon; make deps installs it)");
        let mut address = String::new();
        std::io::BufReader::new(daemon.stdout.take().unwrap()).read_line(&mut address).unwrap();
        assert!(!address.trim().is_empty(), "dbus-daemon printed no address");
        Bus { daemon, address: address.trim().to_owned() }
    }

    async fn connect(bus: &Bus) -> zbus::Connection {
        zbus::connection::Builder::address(bus.address.as_str()).unwrap().build().await.unwrap()
    }

    #[tokio::test]
    async fn sets_the_links_server_and_routing_domain_again_when_the_link_changes_and_reverts_it() {
        let bus = start_bus();
        let client = connect(&bus).await;
        assert!(!available(&client).await, "nobody owns org.freedesktop.resolve1 yet");

        let calls = Arc::new(Mutex::new(Vec::new()));
        let _service = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .serve_at("/org/freedesktop/resolve1", Stub { calls: calls.clone() })
            .unwrap()
            .name(SERVICE)
            .unwrap()
            .build()
            .await
            .unwrap();
        assert!(available(&client).await, "the stub owns the name");

        let mut resolved = Resolved::new(&client, "mesh.local").await.unwrap();
        let server = Ipv4Addr::new(10, 42, 0, 7);
        assert!(resolved.apply(12, server, false).await.unwrap());
        assert!(!resolved.apply(12, server, false).await.unwrap(), "unchanged: no call");
        assert!(resolved.apply(15, server, false).await.unwrap(), "the link came back with another index");
        assert!(resolved.apply(15, server, true).await.unwrap(), "a resync applies again");
        assert!(resolved.revert().await.unwrap());
        assert!(!resolved.revert().await.unwrap());
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "SetLinkDNS 12 [(2, [10, 42, 0, 7])]",
                "SetLinkDomains 12 [(\"mesh.local\", true)]",
                "SetLinkDNS 15 [(2, [10, 42, 0, 7])]",
                "SetLinkDomains 15 [(\"mesh.local\", true)]",
                "SetLinkDNS 15 [(2, [10, 42, 0, 7])]",
                "SetLinkDomains 15 [(\"mesh.local\", true)]",
                "RevertLink 15",
            ]
        );
    }

    #[tokio::test]
    async fn a_refusal_says_what_failed_and_what_to_do() {
        let bus = start_bus();
        let client = connect(&bus).await;
        // Nobody owns the name: the bus refuses the call.
        let mut resolved = Resolved::new(&client, "mesh.local").await.unwrap();
        let err = resolved.apply(3, Ipv4Addr::new(10, 42, 0, 1), false).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("SetLinkDNS") && text.contains("--resolver hosts"), "{text}");
    }
}
