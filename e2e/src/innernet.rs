//! An innernet 2.0 network beside the mesh, on the same lab nodes, for `make bench-peers`
//! (issue 22): `innernet-server` on the first node, an `innernet up --daemon` client on each of
//! the others, both on the userspace backend (wireguard-go, as the lab's agents) with the same
//! MTU as the agents' link. The network is `hmi`, 10.99.0.0/16 (the server 10.99.0.1, peers in
//! the CIDR `nodes`, 10.99.1.0/24), on its own interface `hmi` and UDP ports (server 51900), so
//! it never touches `wg-harness`. Its state lives under `.lab/innernet/`; [`Innernet::teardown`]
//! removes all of it (and `lab.sh down` stops whatever is left in the nodes).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::nodes::Nodes;
use crate::repo_root;

/// The network's name, and its interface's on every member.
pub const NETWORK: &str = "hmi";
/// The server's WireGuard port.
const SERVER_PORT: u16 = 51900;
/// The agents' link MTU (`mesh-agent --mtu` default), so both tunnels carry the same packets.
const MTU: &str = "1420";

/// One innernet network in the lab.
pub struct Innernet {
    nodes: Nodes,
    bin: PathBuf,
    dir: PathBuf,
    /// The node the server runs on (also a member: the server is a peer at 10.99.0.1).
    pub server_node: String,
    /// The admin peer and its node: joins and removals go through its `innernet` client (the
    /// running server takes a new peer into its interface only when told through its API).
    admin: Option<(String, String)>,
}

impl Innernet {
    /// A network whose server runs on `server_node`, with the binaries in `bin` (the directory of
    /// `innernet` and `innernet-server`). Nothing is started yet.
    pub fn new(nodes: Nodes, bin: PathBuf, server_node: &str) -> Self {
        Self { nodes, bin, dir: repo_root().join(".lab/innernet"), server_node: server_node.to_owned(), admin: None }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn server(&self) -> Vec<String> {
        vec![
            self.bin.join("innernet-server").display().to_string(),
            "-c".into(),
            self.path("server/etc"),
            "-d".into(),
            self.path("server/data"),
        ]
    }

    fn client(&self, peer: &str) -> Vec<String> {
        vec![
            self.bin.join("innernet").display().to_string(),
            "-c".into(),
            self.path(&format!("{peer}/etc")),
            "-d".into(),
            self.path(&format!("{peer}/data")),
            "--backend".into(),
            "userspace".into(),
            "--mtu".into(),
            MTU.into(),
        ]
    }

    fn run(&self, node: &str, args: &[String]) -> anyhow::Result<String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes.exec_ok(node, &args)
    }

    /// Starts `args` on `node` in the background, its pid in `<dir>/<name>.pid`, its output in
    /// `<dir>/<name>.log`.
    fn daemon(&self, node: &str, name: &str, args: &[String]) -> anyhow::Result<()> {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "echo $$ > '{pid}'; exec {} > '{log}' 2>&1",
            quoted.join(" "),
            pid = self.path(&format!("{name}.pid")),
            log = self.path(&format!("{name}.log"))
        );
        // setsid: the daemon outlives this exec.
        self.nodes.exec_ok(node, &["setsid", "-f", "sh", "-c", &script])?;
        Ok(())
    }

    fn pid(&self, name: &str) -> anyhow::Result<u32> {
        let path = self.path(&format!("{name}.pid"));
        for _ in 0..50 {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(pid) = text.trim().parse()
            {
                return Ok(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("no pid in {path}")
    }

    /// The server's process.
    pub fn server_pid(&self) -> anyhow::Result<u32> {
        self.pid("server")
    }

    /// The client daemon of `peer`.
    pub fn daemon_pid(&self, peer: &str) -> anyhow::Result<u32> {
        self.pid(peer)
    }

    /// A new network with its server running and `members` ((peer, node)) up, each fetching
    /// every `interval` s; the first member is the admin. Whatever an earlier run left is
    /// removed first. Returns the members' addresses.
    pub fn create(&mut self, members: &[(String, String)], interval: u64) -> anyhow::Result<Vec<Ipv4Addr>> {
        self.teardown();
        for dir in ["server/etc", "server/data"] {
            std::fs::create_dir_all(self.dir.join(dir))?;
        }
        let mut new = self.server();
        new.extend(
            [
                "new",
                "--network-name",
                NETWORK,
                "--network-cidr",
                "10.99.0.0/16",
                "--listen-port",
                &SERVER_PORT.to_string(),
                "--external-endpoint",
            ]
            .map(str::to_owned),
        );
        new.push(format!("{}:{SERVER_PORT}", self.underlay(&self.server_node)?));
        self.run(&self.server_node, &new)?;
        let mut cidr = self.server();
        cidr.extend(
            ["add-cidr", NETWORK, "--name", "nodes", "--cidr", "10.99.1.0/24", "--parent", NETWORK, "--yes"]
                .map(str::to_owned),
        );
        self.run(&self.server_node, &cidr)?;
        // The members are added before the server starts, which reads them at its start.
        for (i, (peer, _)) in members.iter().enumerate() {
            let mut add = self.server();
            add.extend(self.add_peer_args(peer, i == 0));
            self.run(&self.server_node, &add)?;
        }
        let mut serve = self.server();
        serve.extend(["serve", NETWORK, "--backend", "userspace", "--mtu", MTU].map(str::to_owned));
        self.daemon(&self.server_node, "server", &serve)?;
        self.wait_link(&self.server_node)?;
        let mut addresses = Vec::new();
        for (peer, node) in members {
            addresses.push(self.install(peer, node, interval)?);
        }
        self.admin = members.first().cloned();
        Ok(addresses)
    }

    /// `add-peer` arguments for `peer`, its invitation saved to `<dir>/<peer>.toml`.
    fn add_peer_args(&self, peer: &str, admin: bool) -> Vec<String> {
        let mut args: Vec<String> =
            ["add-peer", NETWORK, "--name", peer, "--cidr", "nodes", "--auto-ip", "--yes"].map(str::to_owned).to_vec();
        args.extend(["--admin".into(), admin.to_string()]);
        args.extend([
            "--save-config".into(),
            self.path(&format!("{peer}.toml")),
            "--invite-expires".into(),
            "1d".into(),
        ]);
        args
    }

    /// The admin's client command and node.
    fn admin(&self) -> anyhow::Result<(Vec<String>, &str)> {
        let (peer, node) = self.admin.as_ref().context("the network has no admin: create it first")?;
        Ok((self.client(peer), node))
    }

    /// The node's underlay address (eth0's IPv4).
    fn underlay(&self, node: &str) -> anyhow::Result<String> {
        let out = self.nodes.exec_ok(node, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        let addr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).context("no IPv4 on eth0")?;
        Ok(addr.split('/').next().unwrap_or_default().to_owned())
    }

    fn wait_link(&self, node: &str) -> anyhow::Result<()> {
        for _ in 0..200 {
            if self.nodes.exec(node, &["ip", "link", "show", NETWORK])?.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("innernet's {NETWORK} link did not come up on {node} (see {})", self.dir.display())
    }

    /// Adds peer `peer` through the admin's client, installs its invitation on `node` and starts
    /// its daemon fetching every `interval` seconds; returns its address. (The steps a user
    /// takes.)
    pub fn join(&self, peer: &str, node: &str, interval: u64) -> anyhow::Result<Ipv4Addr> {
        let (mut add, admin_node) = self.admin()?;
        add.extend(self.add_peer_args(peer, false));
        self.run(admin_node, &add)?;
        self.install(peer, node, interval)
    }

    /// Installs `peer`'s invitation on `node` and starts its daemon; returns its address.
    fn install(&self, peer: &str, node: &str, interval: u64) -> anyhow::Result<Ipv4Addr> {
        let invitation = self.path(&format!("{peer}.toml"));
        let text = std::fs::read_to_string(&invitation).with_context(|| format!("reading {invitation}"))?;
        let address: Ipv4Addr = text
            .lines()
            .find_map(|l| l.strip_prefix("address = \""))
            .and_then(|a| a.split('/').next())
            .context("no address in the invitation")?
            .parse()?;
        for dir in ["etc", "data"] {
            std::fs::create_dir_all(self.dir.join(format!("{peer}/{dir}")))?;
        }
        let mut install = self.client(peer);
        install.extend(["install".into(), invitation, "--default-name".into()]);
        // install asks a question on a terminal at its end, after the install is done.
        let args: Vec<&str> = install.iter().map(String::as_str).collect();
        let out = self.nodes.exec(node, &args)?;
        let config = self.dir.join(format!("{peer}/etc/{NETWORK}.conf"));
        if !config.exists() {
            bail!(
                "innernet install {peer} on {node} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.start(peer, node, interval)?;
        Ok(address)
    }

    /// (Re)starts the daemon of an installed `peer` on `node`, fetching every `interval` s.
    pub fn start(&self, peer: &str, node: &str, interval: u64) -> anyhow::Result<()> {
        self.stop(peer);
        let mut up = self.client(peer);
        up.extend(["up".into(), NETWORK.into(), "--daemon".into(), "--interval".into(), interval.to_string()]);
        self.daemon(node, peer, &up)
    }

    /// Stops the daemon of `peer` (its interface stays, as after a crash).
    pub fn stop(&self, peer: &str) {
        if let Ok(text) = std::fs::read_to_string(self.path(&format!("{peer}.pid")))
            && let Ok(pid) = text.trim().parse::<i32>()
        {
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
            for _ in 0..50 {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_file(self.path(&format!("{peer}.pid")));
        }
    }

    /// Takes `peer` off `node` (daemon, interface, hosts entries, config): the machine is gone.
    pub fn leave(&self, peer: &str, node: &str) -> anyhow::Result<()> {
        self.stop(peer);
        let _ = self.nodes.exec(node, &["ip", "link", "del", NETWORK]);
        self.strip_hosts(node)?;
        let _ = std::fs::remove_dir_all(self.dir.join(peer));
        Ok(())
    }

    /// Disables `peer` through the admin's client (innernet keeps disabled peers; there is no
    /// delete).
    pub fn disable(&self, peer: &str) -> anyhow::Result<()> {
        let (mut disable, admin_node) = self.admin()?;
        disable.extend(["disable-peer", NETWORK, "--name", peer, "--yes"].map(str::to_owned));
        self.run(admin_node, &disable)?;
        Ok(())
    }

    /// The public key of `node`'s innernet interface.
    pub fn public_key(&self, node: &str) -> anyhow::Result<String> {
        Ok(self.nodes.exec_ok(node, &["wg", "show", NETWORK, "public-key"])?.trim().to_owned())
    }

    /// The peers (public keys) on `node`'s innernet interface.
    pub fn peers(&self, node: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.nodes.exec_ok(node, &["wg", "show", NETWORK, "peers"])?.lines().map(str::to_owned).collect())
    }

    /// Removes innernet's block from `node`'s hosts file.
    fn strip_hosts(&self, node: &str) -> anyhow::Result<()> {
        // In place: the lab's per-node hosts file is bind-mounted and cannot be renamed over.
        let script = format!(
            "t=$(mktemp) && sed '/# DO NOT EDIT innernet {NETWORK} BEGIN/,/# DO NOT EDIT innernet {NETWORK} END/d' \
             /etc/hosts > \"$t\" && cat \"$t\" > /etc/hosts; rm -f \"$t\""
        );
        self.nodes.exec_ok(node, &["sh", "-c", &script])?;
        Ok(())
    }

    /// Stops every innernet process of the lab, removes the interfaces, the hosts blocks and the
    /// state. Best effort: run before and after a bench.
    pub fn teardown(&self) {
        let _ = std::process::Command::new("pkill").args(["-f", &self.dir.display().to_string()]).status();
        for node in &self.nodes.names {
            let _ = self.nodes.exec(node, &["ip", "link", "del", NETWORK]);
            let _ = self.strip_hosts(node);
        }
        // wireguard-go exits once its tun device is gone; the ones left are stopped here.
        let _ = std::process::Command::new("pkill").args(["-f", &format!("wireguard-go {NETWORK}$")]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
