//! Names for the node's own processes (`--resolver`): whatever calls `getaddrinfo` on the node
//! — a native service, `curl`, `ssh` — finds `*.mesh.local` without hand-editing a resolver.
//!
//! - `hosts` ([`hosts`]): a managed block in `/etc/hosts` (`--hosts-file`) with every name of the
//!   zone the agent's DNS server serves, rewritten when the names change; lines outside it are
//!   never touched. Works with any libc resolver and with mDNS in nsswitch.
//! - `resolved` ([`resolved`]): split DNS through systemd-resolved's D-Bus API: the agent's DNS
//!   server on the WireGuard link, `~mesh.local` as its routing-only domain.
//! - `auto`: `resolved` when systemd-resolved answers on the system bus (and DNS is served on
//!   port 53), else `hosts`.
//! - `off`: nothing (only the agent's DNS server answers, for whoever asks it).
//!
//! On exit the agent takes out what it added: the block, or the link's resolved settings.

pub mod hosts;
pub mod resolved;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use mesh_dataplane::dns::Zone;

use crate::link::Links;

/// `--resolver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// resolved where systemd-resolved answers on the system bus, else hosts.
    Auto,
    /// Split DNS for the zone on the WireGuard link through systemd-resolved (D-Bus).
    Resolved,
    /// A managed block in the hosts file.
    Hosts,
    /// Leave the node's resolver alone.
    Off,
}

/// What the agent keeps up to date.
pub enum Names {
    Off,
    /// The hosts file, the revision of the zone's records last written to it (see
    /// `mesh_plan::Directory::zone_revision`) and the file's stamp right after.
    Hosts(hosts::HostsFile, Option<(u64, Option<hosts::Stamp>)>),
    Resolved {
        client: resolved::Resolved,
        interface: String,
    },
}

impl Names {
    /// Picks and prepares the mode. `dns_port` is the agent's DNS port (resolved can only use
    /// port 53).
    pub async fn start(
        mode: Mode,
        hosts_file: PathBuf,
        interface: &str,
        dns_port: u16,
        zone: &str,
    ) -> anyhow::Result<Self> {
        let hosts = || Names::Hosts(hosts::HostsFile { path: hosts_file.clone() }, None);
        let names = match mode {
            Mode::Off => Names::Off,
            Mode::Hosts => hosts(),
            Mode::Resolved => {
                anyhow::ensure!(
                    dns_port == 53,
                    "--resolver resolved needs the agent's DNS on port 53 (--dns-port is {dns_port}): systemd-resolved \
                     asks port 53; use --resolver hosts otherwise"
                );
                let bus = resolved::system_bus().await.map_err(|err| {
                    err.context("--resolver resolved: systemd-resolved cannot be reached; use --resolver hosts")
                })?;
                anyhow::ensure!(
                    resolved::available(&bus).await,
                    "--resolver resolved: nothing owns {} on the system bus (systemd-resolved is not running); use \
                     --resolver hosts",
                    resolved::SERVICE
                );
                Names::Resolved { client: resolved::Resolved::new(&bus, zone).await?, interface: interface.to_owned() }
            }
            Mode::Auto => match auto_resolved(dns_port).await {
                Ok(bus) => Names::Resolved {
                    client: resolved::Resolved::new(&bus, zone).await?,
                    interface: interface.to_owned(),
                },
                Err(why) => {
                    tracing::info!("--resolver auto: {why}; using the hosts file {}", hosts_file.display());
                    hosts()
                }
            },
        };
        match &names {
            Names::Off => {}
            Names::Hosts(file, _) => {
                tracing::info!("names of {zone} go into a managed block of {}", file.path.display())
            }
            Names::Resolved { interface, .. } => {
                tracing::info!("names of {zone} resolve through systemd-resolved: split DNS on {interface}")
            }
        }
        Ok(names)
    }

    /// Brings the node's resolver up to date with `zone` (served by the agent at `server`), whose
    /// records' revision is `revision`. The hosts file is rewritten only when the revision moved
    /// (rendering every name of 50,000 services on every sync cost more than the rest of the
    /// sync), or on a `resync` when the file changed since the agent wrote it (someone edited
    /// it: the block is put back).
    pub async fn update(
        &mut self,
        zone: &Zone,
        revision: u64,
        server: Option<Ipv4Addr>,
        resync: bool,
        links: &Links,
    ) -> anyhow::Result<()> {
        match self {
            Names::Off => Ok(()),
            Names::Hosts(file, written) => {
                if up_to_date(*written, revision, resync, || file.stamp()) {
                    return Ok(());
                }
                let block = mesh_dataplane::hosts::render(&zone.records);
                let path = file.path.clone();
                let (changed, stamp) = mesh_agent::cputime::spawn_blocking({
                    let file = file.clone();
                    move || file.apply(&block).map(|changed| (changed, file.stamp()))
                })
                .await??;
                if changed {
                    tracing::info!(names = zone.records.len(), "updated the harness-mesh block of {}", path.display());
                }
                *written = Some((revision, stamp));
                Ok(())
            }
            Names::Resolved { client, interface } => {
                let (Some(server), Some(index)) = (server, links.index(interface).await?) else { return Ok(()) };
                if client.apply(index, server, resync).await? {
                    tracing::debug!(%server, ifindex = index, "systemd-resolved: split DNS set on {interface}");
                }
                Ok(())
            }
        }
    }

    /// Takes out what the agent added (on exit).
    pub async fn remove(&mut self) {
        match self {
            Names::Off => {}
            Names::Hosts(file, _) => match file.remove() {
                Ok(true) => tracing::info!("removed the harness-mesh block from {}", file.path.display()),
                Ok(false) => {}
                Err(err) => tracing::warn!("{err:#}; remove the harness-mesh block by hand (mesh-agent cleanup does)"),
            },
            Names::Resolved { client, interface } => match client.revert().await {
                Ok(true) => tracing::info!("reverted systemd-resolved's settings of {interface}"),
                Ok(false) => {}
                Err(err) => tracing::warn!("{err:#}"),
            },
        }
    }
}

/// Whether the hosts file needs no write: the zone's `revision` is the one last `written`, and on
/// a `resync` the file's stamp (`now`, read only then) is still the one taken after that write.
fn up_to_date(
    written: Option<(u64, Option<hosts::Stamp>)>,
    revision: u64,
    resync: bool,
    now: impl FnOnce() -> Option<hosts::Stamp>,
) -> bool {
    match written {
        Some((done, stamp)) if done == revision => !resync || (stamp.is_some() && now() == stamp),
        _ => false,
    }
}

/// The system bus, if `auto` should use resolved there; else why not.
async fn auto_resolved(dns_port: u16) -> Result<zbus::Connection, String> {
    if dns_port != 53 {
        return Err(format!("the agent's DNS is on port {dns_port}, and systemd-resolved asks port 53 only"));
    }
    let bus = resolved::system_bus().await.map_err(|err| format!("{err:#}"))?;
    if resolved::available(&bus).await {
        Ok(bus)
    } else {
        Err(format!("nothing owns {} on the system bus", resolved::SERVICE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_file_is_written_when_the_names_moved_or_on_a_resync_when_someone_wrote_it() {
        let dir = std::env::temp_dir().join(format!("hm-hosts-up-to-date-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = hosts::HostsFile { path: dir.join("hosts") };
        let block =
            mesh_dataplane::hosts::render(&[("a.mesh.local".to_owned(), vec![Ipv4Addr::new(10, 42, 0, 1)])].into());
        assert!(file.apply(&block).unwrap());
        let written = Some((7, file.stamp()));
        let never = || -> Option<hosts::Stamp> { panic!("the file is not looked at between resyncs") };
        assert!(!up_to_date(None, 7, false, never), "never written");
        assert!(!up_to_date(written, 8, false, never), "the names moved");
        assert!(up_to_date(written, 7, false, never), "the same names, no resync: not even a stat");
        assert!(up_to_date(written, 7, true, || file.stamp()), "a resync, the file as the agent left it");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file.path, "127.0.0.1\tlocalhost\n").unwrap();
        assert!(!up_to_date(written, 7, true, || file.stamp()), "someone wrote it: the resync repairs it");
        assert!(!up_to_date(Some((7, None)), 7, true, || file.stamp()), "no stamp after the write: rewrite");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
