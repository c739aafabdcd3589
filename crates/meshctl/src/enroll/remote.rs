//! What enroll puts on the machine, and the shell scripts that look at it, change it and clean
//! it up; no I/O here. Every script is plain POSIX `sh`, run as root (directly or through
//! `sudo -n`), and avoids backslashes and single quotes so that any login shell passes it on
//! unchanged.
//!
//! On the machine:
//!
//! | path | what |
//! |---|---|
//! | `/usr/local/bin/mesh-agent` | the agent binary |
//! | `/etc/harness-mesh/kubeconfig` (0600) | API server, its CA, the agent's node-bound token |
//! | `/etc/harness-mesh/agent.env` | `NODE_NAME`, `KUBECONFIG`, `RUST_LOG` |
//! | `/etc/harness-mesh/enrollment` | meshctl's record: name, where from, the token's Pod and expiry (no secret) |
//! | `/var/lib/harness-mesh/` (0700) | the agent's state: its private key, made there by the agent |
//! | `/etc/systemd/system/harness-mesh-agent.service` | where systemd is PID 1 |
//! | `/usr/local/lib/harness-mesh/mesh-agent-supervisor` | elsewhere: a `sh` loop that restarts the agent |
//! | `/run/harness-mesh/`, `/var/log/harness-mesh-agent.log` | the supervisor's pid files and the agent's log |

use std::collections::BTreeMap;

use super::args::Resolver;

/// The agent binary on the machine.
pub const AGENT_PATH: &str = "/usr/local/bin/mesh-agent";
/// The agent's kubeconfig.
pub const KUBECONFIG_PATH: &str = "/etc/harness-mesh/kubeconfig";
/// The directory of the agent's configuration and credential.
pub const CONFIG_DIR: &str = "/etc/harness-mesh";
/// The agent's API token (0600), named by the kubeconfig and renewed by the agent.
pub const TOKEN_PATH: &str = "/etc/harness-mesh/token";
/// The agent's environment.
pub const ENV_PATH: &str = "/etc/harness-mesh/agent.env";
/// meshctl's record of the enrollment.
pub const RECORD_PATH: &str = "/etc/harness-mesh/enrollment";
/// The agent's state directory (its private key).
pub const STATE_DIR: &str = "/var/lib/harness-mesh";
/// The systemd unit.
pub const UNIT_PATH: &str = "/etc/systemd/system/harness-mesh-agent.service";
/// The systemd unit's name.
pub const UNIT_NAME: &str = "harness-mesh-agent.service";
/// The supervisor script used without systemd.
pub const SUPERVISOR_PATH: &str = "/usr/local/lib/harness-mesh/mesh-agent-supervisor";
/// The supervisor's log (the agent's output).
pub const LOG_PATH: &str = "/var/log/harness-mesh-agent.log";
/// The agent's metrics, on the machine's loopback only.
pub const METRICS_ADDR: &str = "127.0.0.1:9464";

/// How the agent is kept running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// A systemd service (systemd is PID 1).
    Systemd,
    /// The supervisor loop, started under `setsid`.
    Supervised,
}

impl Init {
    /// For progress lines.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Systemd => "systemd service harness-mesh-agent",
            Self::Supervised => "supervised process (no systemd)",
        }
    }
}

/// What [`PROBE`] found on the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// `uname -s`.
    pub os: String,
    /// `uname -m`.
    pub arch: String,
    /// Whether systemd is PID 1.
    pub systemd: bool,
    /// Tools found on PATH.
    pub tools: Vec<String>,
    /// Whether the kernel has (or can load) the WireGuard module.
    pub wireguard_kernel: bool,
    /// Whether /dev/net/tun exists.
    pub tun: bool,
    /// SHA-256 of each managed file present, by path.
    pub files: BTreeMap<String, String>,
    /// meshctl's record ([`RECORD_PATH`]), if any.
    pub record: Option<Record>,
    /// The running agent's pid, if any.
    pub agent_pid: Option<u32>,
}

impl Machine {
    /// How the agent will be kept running.
    pub fn init(&self) -> Init {
        if self.systemd { Init::Systemd } else { Init::Supervised }
    }

    /// Whether `tool` is on the machine's PATH.
    pub fn has(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }

    /// What is missing for a tunnel, if anything (the agent then runs without one).
    pub fn tunnel_problem(&self) -> Option<String> {
        if self.wireguard_kernel {
            return None;
        }
        match (self.has("wireguard-go"), self.tun) {
            (true, true) => None,
            (false, _) => Some(
                "neither the WireGuard kernel module nor wireguard-go is there (Debian: apt-get install wireguard-go)"
                    .to_owned(),
            ),
            (true, false) => Some("the kernel has no WireGuard module and there is no /dev/net/tun".to_owned()),
        }
    }
}

/// Looks at the machine; prints `key=value` lines that [`parse_probe`] reads. Run as root.
pub const PROBE: &str = r#"
echo "os=$(uname -s)"
echo "arch=$(uname -m)"
if [ -d /run/systemd/system ]; then echo systemd=yes; fi
for tool in wireguard-go nft ip setsid sha256sum systemctl; do
  if command -v "$tool" >/dev/null 2>&1; then echo "tool=$tool"; fi
done
if [ -d /sys/module/wireguard ] || modprobe -n wireguard >/dev/null 2>&1; then echo wireguard_kernel=yes; fi
if [ -c /dev/net/tun ]; then echo tun=yes; fi
files="/usr/local/bin/mesh-agent /etc/harness-mesh/kubeconfig /etc/harness-mesh/token /etc/harness-mesh/agent.env"
files="$files /etc/harness-mesh/enrollment /etc/systemd/system/harness-mesh-agent.service"
files="$files /usr/local/lib/harness-mesh/mesh-agent-supervisor"
for f in $files; do
  if [ -f "$f" ]; then echo "file=$(sha256sum "$f")"; fi
done
if [ -f /etc/harness-mesh/enrollment ]; then sed -n "s/^\([a-z0-9_]*\)=/record.\1=/p" /etc/harness-mesh/enrollment; fi
if [ -d /run/systemd/system ] && systemctl is-active --quiet harness-mesh-agent 2>/dev/null; then
  echo "agent=$(systemctl show -p MainPID --value harness-mesh-agent)"
else
  pid="$(cat /run/harness-mesh/agent.pid 2>/dev/null || true)"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = mesh-agent ]; then echo "agent=$pid"; fi
fi
"#;

/// Reads [`PROBE`]'s output.
pub fn parse_probe(text: &str) -> Machine {
    let mut machine = Machine::default();
    let mut record = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        match key {
            "os" => machine.os = value.to_owned(),
            "arch" => machine.arch = value.to_owned(),
            "systemd" => machine.systemd = value == "yes",
            "tool" => machine.tools.push(value.to_owned()),
            "wireguard_kernel" => machine.wireguard_kernel = value == "yes",
            "tun" => machine.tun = value == "yes",
            "file" => {
                if let Some((sum, path)) = value.split_once(char::is_whitespace) {
                    machine.files.insert(path.trim().trim_start_matches('*').to_owned(), sum.to_owned());
                }
            }
            "agent" => machine.agent_pid = value.parse().ok().filter(|pid| *pid > 0),
            _ => {
                if let Some(field) = key.strip_prefix("record.") {
                    record.insert(field.to_owned(), value.to_owned());
                }
            }
        }
    }
    machine.record = Record::from_fields(&record);
    machine
}

/// meshctl's record of an enrollment, kept on the machine ([`RECORD_PATH`]). Not a secret: it
/// tells a later enroll whether the token it issued can be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The MeshNode name.
    pub name: String,
    /// `ssh://user@host:port` as enrolled.
    pub enrolled_via: String,
    /// The uid of the machine's ServiceAccount the token belongs to.
    pub account_uid: String,
    /// When the token expires, Unix seconds.
    pub token_expires: i64,
    /// The API server URL in the kubeconfig.
    pub api_server: String,
    /// SHA-256 of the CA in the kubeconfig (empty: none).
    pub ca_sha256: String,
    /// SHA-256 of the kubeconfig written with that token.
    pub kubeconfig_sha256: String,
}

impl Record {
    fn from_fields(fields: &BTreeMap<String, String>) -> Option<Self> {
        let get = |key: &str| fields.get(key).cloned();
        Some(Self {
            name: get("name")?,
            enrolled_via: get("enrolled_via").unwrap_or_default(),
            account_uid: get("account_uid").unwrap_or_default(),
            token_expires: get("token_expires").and_then(|v| v.parse().ok()).unwrap_or(0),
            api_server: get("api_server").unwrap_or_default(),
            ca_sha256: get("ca_sha256").unwrap_or_default(),
            kubeconfig_sha256: get("kubeconfig_sha256").unwrap_or_default(),
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        format!(
            "# Written by meshctl enroll, read by meshctl enroll and unenroll. No secret in here.\n\
             name={}\nenrolled_via={}\naccount_uid={}\ntoken_expires={}\napi_server={}\nca_sha256={}\n\
             kubeconfig_sha256={}\n",
            self.name,
            self.enrolled_via,
            self.account_uid,
            self.token_expires,
            self.api_server,
            self.ca_sha256,
            self.kubeconfig_sha256
        )
    }
}

/// The agent's environment file (systemd `EnvironmentFile=`, sourced by the supervisor).
pub fn agent_env(name: &str, resolver: Resolver, zone: &str, container_socket: Option<&str>) -> String {
    let socket = container_socket.map(|path| format!("MESH_CONTAINER_SOCKET={path}\n")).unwrap_or_default();
    format!(
        "# mesh-agent's environment, written by meshctl enroll.\n\
         NODE_NAME={name}\nKUBECONFIG={KUBECONFIG_PATH}\nMESH_TOKEN_FILE={TOKEN_PATH}\nMESH_RESOLVER={}\nMESH_ZONE={zone}\n{socket}RUST_LOG=info\n",
        resolver.as_str()
    )
}

/// The agent's command line (after the environment of [`agent_env`]).
pub fn agent_command(lease_namespace: &str) -> String {
    format!("{AGENT_PATH} --state-dir {STATE_DIR} --lease-namespace {lease_namespace} --metrics-addr {METRICS_ADDR}")
}

/// The systemd unit. `KillMode=process`: stopping or restarting the agent leaves the userspace
/// WireGuard daemon it started running, so tunnels survive an agent restart (as in the
/// DaemonSet, where wireguard-go outlives the agent's container).
///
/// Hardened: the agent runs as root but keeps only the capabilities it uses (NET_ADMIN for
/// links, WireGuard and nftables; NET_BIND_SERVICE for DNS on port 53), sees a read-only system
/// with three writable places (its state dir with the private key, /etc/harness-mesh where it
/// renews its token, /run/wireguard for the userspace device's socket), one device
/// (/dev/net/tun), no home directories, no kernel tunables, modules, logs or clock, and the
/// address families it speaks (unix, IPv4, IPv6, netlink). `systemd-analyze security` rates it
/// below 3 ("OK"); the unit's test keeps it there. wireguard-go, its child, gets the same.
///
/// With `--resolver hosts` or `auto`, /etc/hosts is writable too (`-`: where it exists).
pub fn systemd_unit(lease_namespace: &str, resolver: Resolver) -> String {
    format!(
        "# harness-mesh agent, installed by meshctl enroll; meshctl unenroll removes it.\n\
         [Unit]\n\
         Description=harness-mesh agent (WireGuard mesh node)\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         EnvironmentFile={ENV_PATH}\n\
         ExecStart={command}\n\
         Restart=always\n\
         RestartSec=2\n\
         KillMode=process\n\
         # What the agent needs, and nothing else.\n\
         CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n\
         AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         StateDirectory=harness-mesh\n\
         StateDirectoryMode=0700\n\
         RuntimeDirectory=wireguard\n\
         RuntimeDirectoryPreserve=yes\n\
         ReadWritePaths={config_dir}{hosts}\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         DevicePolicy=closed\n\
         DeviceAllow=/dev/net/tun rw\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectProc=invisible\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         SystemCallFilter=@system-service\n\
         SystemCallErrorNumber=EPERM\n\
         UMask=0077\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        command = agent_command(lease_namespace),
        config_dir = CONFIG_DIR,
        hosts = if resolver.may_write_hosts() { " -/etc/hosts" } else { "" },
    )
}

/// The supervisor for machines without systemd: runs the agent, starts it again 2 s after it
/// exits, and on SIGTERM stops it and exits. Its pid and the agent's are in /run/harness-mesh/,
/// the agent's output in [`LOG_PATH`] (moved to `.1` past 10 MiB). Nothing starts it at boot:
/// running enroll again does (idempotent), or hook it into the machine's init.
pub fn supervisor_script(lease_namespace: &str) -> String {
    format!(
        r#"#!/bin/sh
# harness-mesh agent supervisor, installed by meshctl enroll on a machine without systemd;
# meshctl unenroll removes it. Stop: kill "$(cat /run/harness-mesh/supervisor.pid)"
set -u
run=/run/harness-mesh
log={LOG_PATH}
mkdir -p "$run"
echo $$ >"$run/supervisor.pid"
child=
stop() {{
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi
  rm -f "$run/supervisor.pid" "$run/agent.pid"
  exit 0
}}
trap stop TERM INT
trap "" HUP
while :; do
  if [ -f "$log" ] && [ "$(wc -c <"$log")" -gt 10485760 ]; then mv -f "$log" "$log.1"; fi
  set -a
  . {ENV_PATH}
  set +a
  {command} >>"$log" 2>&1 &
  child=$!
  echo "$child" >"$run/agent.pid"
  wait "$child"
  status=$?
  child=
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) mesh-agent exited with status $status; starting it again in 2 s" >>"$log"
  sleep 2 &
  wait $!
done
"#,
        command = agent_command(lease_namespace)
    )
}

/// Writes stdin to `$1` with mode `$2` (atomically: a temporary file, then `mv`), making its
/// directory (0700) if needed, and prints its SHA-256.
pub const WRITE_FILE: &str = r#"set -e
umask 077
mkdir -p "$(dirname "$1")"
cat >"$1.meshctl-new"
chmod "$2" "$1.meshctl-new"
mv -f "$1.meshctl-new" "$1"
sha256sum "$1"
"#;

/// Shell functions shared by [`start_script`] and [`uninstall_script`]: `stop_agent` stops the service or
/// the supervisor (SIGTERM, SIGKILL after 10 s) and the agent.
const STOP_FUNCTIONS: &str = r#"
live() {
  [ -e "/proc/$1" ] && [ "$(sed -n "s/^State:[[:space:]]*\([A-Z]\).*/\1/p" "/proc/$1/status" 2>/dev/null)" != Z ]
}
stop_agent() {
  if [ -d /run/systemd/system ] && [ -f /etc/systemd/system/harness-mesh-agent.service ]; then
    systemctl stop harness-mesh-agent.service 2>/dev/null || true
  fi
  pid="$(cat /run/harness-mesh/supervisor.pid 2>/dev/null || true)"
  if [ -n "$pid" ] && live "$pid" && grep -qa mesh-agent-supervisor "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    i=0
    while [ $i -lt 100 ] && live "$pid"; do sleep 0.1; i=$((i + 1)); done
    if live "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  apid="$(cat /run/harness-mesh/agent.pid 2>/dev/null || true)"
  if [ -n "$apid" ] && [ "$(cat "/proc/$apid/comm" 2>/dev/null)" = mesh-agent ]; then
    kill -TERM "$apid" 2>/dev/null || true
    i=0
    while [ $i -lt 50 ] && live "$apid"; do sleep 0.1; i=$((i + 1)); done
    if live "$apid"; then kill -KILL "$apid" 2>/dev/null || true; fi
  fi
  rm -f /run/harness-mesh/supervisor.pid /run/harness-mesh/agent.pid
}
"#;

/// Starts the agent, or restarts it when `$1` is `restart`; `$2` is `systemd` or `supervised`.
/// Prints `agent=PID` once it has run for a second, or fails with the end of its log.
pub fn start_script() -> String {
    format!(
        r#"set -e
{STOP_FUNCTIONS}
mkdir -p {STATE_DIR}
chmod 700 {STATE_DIR}
agent_pid() {{
  if [ "$2" = systemd ]; then
    systemctl is-active --quiet {UNIT_NAME} && systemctl show -p MainPID --value {UNIT_NAME}
  else
    p="$(cat /run/harness-mesh/agent.pid 2>/dev/null || true)"
    if [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = mesh-agent ]; then echo "$p"; fi
  fi
}}
if [ "$1" != restart ] && [ -n "$(agent_pid "$@" || true)" ]; then
  echo "agent=$(agent_pid "$@")"
  echo state=running
  exit 0
fi
if [ "$2" = systemd ]; then
  systemctl daemon-reload
  systemctl enable --quiet {UNIT_NAME}
  systemctl restart {UNIT_NAME}
else
  stop_agent
  mkdir -p /run/harness-mesh
  path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  env -i PATH="$path" setsid {SUPERVISOR_PATH} </dev/null >/dev/null 2>&1 &
fi
i=0
pid=
while [ $i -lt 100 ]; do
  pid="$(agent_pid "$@" || true)"
  if [ -n "$pid" ]; then break; fi
  sleep 0.1
  i=$((i + 1))
done
if [ -n "$pid" ]; then
  sleep 1
  if [ "$(agent_pid "$@" || true)" = "$pid" ]; then
    echo "agent=$pid"
    echo state=started
    exit 0
  fi
fi
echo "mesh-agent did not keep running; the end of its log:" >&2
if [ "$2" = systemd ]; then
  journalctl -u {UNIT_NAME} -n 20 --no-pager >&2 || true
else
  tail -n 20 {LOG_PATH} >&2 || true
fi
exit 1
"#
    )
}

/// The end of the agent's log.
pub const LOG_TAIL: &str = r#"
if [ -d /run/systemd/system ] && [ -f /etc/systemd/system/harness-mesh-agent.service ]; then
  journalctl -u harness-mesh-agent.service -n "$1" --no-pager 2>&1 || true
else
  tail -n "$1" /var/log/harness-mesh-agent.log 2>&1 || true
fi
"#;

/// Stops the agent and removes everything enroll installed, and what the agent leaves behind by
/// design (the WireGuard device and its daemon, the port rules); `$1` is the MeshNode name the
/// machine must be enrolled as (else nothing is touched). Prints `removed` or `not-enrolled` /
/// `enrolled-as=OTHER`.
pub fn uninstall_script() -> String {
    format!(
        r#"set -e
{STOP_FUNCTIONS}
current="$(sed -n "s/^NODE_NAME=//p" {ENV_PATH} 2>/dev/null || true)"
if [ -z "$current" ] && [ ! -e {AGENT_PATH} ] && [ ! -e {STATE_DIR} ]; then echo not-enrolled; exit 0; fi
if [ -n "$current" ] && [ "$current" != "$1" ]; then echo "enrolled-as=$current"; exit 0; fi
stop_agent
if [ -d /run/systemd/system ] && [ -f {UNIT_PATH} ]; then
  systemctl disable --quiet {UNIT_NAME} 2>/dev/null || true
  rm -f {UNIT_PATH}
  systemctl daemon-reload || true
fi
# The device outlives the agent on purpose (restarts keep tunnels up): remove it now, and the
# userspace daemon serving it (wireguard-go wg-harness in this network namespace) with its socket.
if ip link show wg-harness >/dev/null 2>&1; then ip link delete wg-harness || true; fi
i=0
while [ $i -lt 50 ] && [ -S /run/wireguard/wg-harness.sock ]; do
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = wireguard-go ] || continue
    [ "$(readlink "$p/ns/net")" = "$(readlink /proc/self/ns/net)" ] || continue
    tr "\0" " " <"$p/cmdline" 2>/dev/null | grep -qw wg-harness || continue
    kill -TERM "${{p#/proc/}}" 2>/dev/null || true
  done
  sleep 0.1
  i=$((i + 1))
  if ! ip link show wg-harness >/dev/null 2>&1; then rm -f /run/wireguard/wg-harness.sock; fi
done
if command -v nft >/dev/null 2>&1; then nft delete table inet harness_mesh 2>/dev/null || true; fi
# The agent takes its block out of /etc/hosts when it stops; if it was killed first, its cleanup
# does (only the block: every other line stays as it was).
if grep -q "^# BEGIN harness-mesh" /etc/hosts 2>/dev/null && [ -x {AGENT_PATH} ]; then
  {AGENT_PATH} cleanup --keep-state --hosts-file /etc/hosts >/dev/null 2>&1 || true
fi
rm -rf /etc/harness-mesh {STATE_DIR} /run/harness-mesh /usr/local/lib/harness-mesh
rm -f {AGENT_PATH} {LOG_PATH} {LOG_PATH}.1
echo removed
"#
    )
}

/// The CPU `uname -m` names for the machine type in an ELF header (`e_machine`).
pub fn elf_arch(header: &[u8]) -> Option<&'static [&'static str]> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return None;
    }
    // e_ident[EI_DATA]: 1 little-endian, 2 big-endian.
    let machine = match header[5] {
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => u16::from_le_bytes([header[18], header[19]]),
    };
    Some(match machine {
        0x3e => &["x86_64", "amd64"],
        0xb7 => &["aarch64", "arm64"],
        0x28 => &["armv7l", "armv6l", "armv8l", "arm"],
        0x03 => &["i386", "i486", "i586", "i686"],
        0xf3 => &["riscv64"],
        0x15 => &["ppc64le", "ppc64"],
        0x16 => &["s390x"],
        _ => &[],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_read_back() {
        let text = "os=Linux\narch=x86_64\ntool=wireguard-go\ntool=nft\ntun=yes\n\
                    file=0a1b  /usr/local/bin/mesh-agent\nfile=ffee  /etc/harness-mesh/agent.env\n\
                    record.name=edge-1\nrecord.enrolled_via=ssh://root@h:22\nrecord.account_uid=u-1\n\
                    record.token_expires=1900000000\nrecord.api_server=https://k:6443\nrecord.ca_sha256=cc\n\
                    agent=4242\nnoise without equals\n";
        let machine = parse_probe(text);
        assert_eq!(machine.os, "Linux");
        assert_eq!(machine.init(), Init::Supervised);
        assert!(machine.has("nft") && !machine.has("systemctl"));
        assert_eq!(machine.files.get(AGENT_PATH).map(String::as_str), Some("0a1b"));
        assert_eq!(machine.files.get(ENV_PATH).map(String::as_str), Some("ffee"));
        assert_eq!(machine.agent_pid, Some(4242));
        assert_eq!(machine.tunnel_problem(), None);
        let record = machine.record.unwrap();
        assert_eq!((record.name.as_str(), record.token_expires), ("edge-1", 1_900_000_000));
        let again = parse_probe(&record.render().lines().map(|l| format!("record.{l}\n")).collect::<String>());
        assert_eq!(again.record.as_ref(), Some(&record));

        let bare = parse_probe("os=Linux\narch=aarch64\nsystemd=yes\n");
        assert_eq!((bare.init(), bare.record.clone(), bare.agent_pid), (Init::Systemd, None, None));
        assert!(bare.tunnel_problem().unwrap().contains("wireguard-go"));
        let kernel = parse_probe("wireguard_kernel=yes\n");
        assert_eq!(kernel.tunnel_problem(), None);
    }

    #[test]
    fn the_agent_runs_as_the_lab_runs_it() {
        assert_eq!(
            agent_command("harness-mesh"),
            "/usr/local/bin/mesh-agent --state-dir /var/lib/harness-mesh --lease-namespace harness-mesh \
             --metrics-addr 127.0.0.1:9464"
        );
        let env = agent_env("edge-1", Resolver::Hosts, "mesh.internal", None);
        assert!(!env.contains("MESH_CONTAINER_SOCKET"), "{env}");
        let with_socket =
            agent_env("edge-1", Resolver::Hosts, "mesh.internal", Some("/run/user/1000/podman/podman.sock"));
        assert!(with_socket.contains("\nMESH_CONTAINER_SOCKET=/run/user/1000/podman/podman.sock\n"), "{with_socket}");
        assert!(env.contains("NODE_NAME=edge-1\n") && env.contains("KUBECONFIG=/etc/harness-mesh/kubeconfig\n"));
        let unit = systemd_unit("harness-mesh", Resolver::Auto);
        assert!(unit.contains("EnvironmentFile=/etc/harness-mesh/agent.env\n"));
        assert!(env.contains("MESH_TOKEN_FILE=/etc/harness-mesh/token\n"), "{env}");
        assert!(env.contains("MESH_RESOLVER=hosts\n") && env.contains("MESH_ZONE=mesh.internal\n"), "{env}");
        assert!(unit.contains("ReadWritePaths=/etc/harness-mesh -/etc/hosts\n"), "hosts or auto may write /etc/hosts");
        assert!(systemd_unit("harness-mesh", Resolver::Off).contains("ReadWritePaths=/etc/harness-mesh\n"));
        assert!(unit.contains("KillMode=process\n") && unit.contains("Restart=always\n"));
        let supervisor = supervisor_script("mesh");
        assert!(supervisor.starts_with("#!/bin/sh\n"));
        assert!(supervisor.contains("--lease-namespace mesh "));
    }

    /// The unit's exposure as `systemd-analyze security` rates it (0 safest, 10 worst): 9.6
    /// "UNSAFE" before it was hardened. Needs systemd-analyze (Debian's systemd package; `make
    /// deps` installs it); it rates the file offline, without a running systemd.
    #[test]
    fn the_systemd_unit_is_hardened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(UNIT_NAME);
        std::fs::write(&path, systemd_unit("harness-mesh", Resolver::Auto)).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=30"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian package systemd; make deps installs it) rates the unit's hardening");
        let text = String::from_utf8_lossy(&out.stdout);
        let verdict = text.lines().rev().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
        assert!(
            out.status.success(),
            "the unit's exposure is above 3.0: {verdict}\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(verdict.contains("OK") || verdict.contains("SAFE"), "{verdict}");
    }

    #[test]
    fn scripts_survive_any_login_shell() {
        // Sent through the login shell inside single quotes: no quote may end them early, and
        // fish would rewrite backslash escapes.
        for script in [PROBE.to_owned(), WRITE_FILE.to_owned(), start_script(), LOG_TAIL.to_owned(), uninstall_script()]
        {
            assert!(!script.contains('\''), "{script}");
            assert!(!script.contains(r"\\"), "{script}");
        }
    }

    #[test]
    fn scripts_are_valid_sh() {
        let scripts = [
            PROBE.to_owned(),
            WRITE_FILE.to_owned(),
            start_script(),
            LOG_TAIL.to_owned(),
            uninstall_script(),
            supervisor_script("harness-mesh"),
        ];
        for script in scripts {
            let out = std::process::Command::new("sh").args(["-n", "-c", &script]).output().unwrap();
            assert!(out.status.success(), "{}\n{script}", String::from_utf8_lossy(&out.stderr));
        }
    }

    #[test]
    fn elf_headers_name_the_cpu() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[5] = 1;
        header[18] = 0x3e;
        assert_eq!(elf_arch(&header), Some(&["x86_64", "amd64"][..]));
        header[18] = 0xb7;
        assert!(elf_arch(&header).unwrap().contains(&"aarch64"));
        assert_eq!(elf_arch(b"#!/bin/sh\n echo not an elf file"), None);
    }
}
