//! The system OpenSSH client as enroll's transport.
//!
//! Why `ssh(1)` and not an SSH library: it is the client the user already trusts and has set up.
//! It reads their `~/.ssh/config` (host aliases, users, ports, `ProxyJump`), uses their
//! ssh-agent, security keys and certificates, and checks host keys against their known_hosts in
//! every format OpenSSH writes (hashed names, `@cert-authority`, `@revoked`), exactly as a
//! plain `ssh` would. A library would reimplement all of that, and diverge from it where it
//! matters most: host key verification.
//!
//! One connection serves all of a command's steps: the first `ssh` becomes the master of a
//! private control socket (`ControlMaster`, in a temporary directory only this user can read),
//! so a passphrase or a security-key touch is asked for once, and each later step is a cheap new
//! session on it. Host keys are always checked (`StrictHostKeyChecking=yes`; with
//! `--accept-new-host-key`, `accept-new`, which still refuses a changed key), and an `--ssh-option`
//! cannot change that. A failed connection is classified from ssh's own messages (unknown or
//! changed host key, failed authentication, unreachable host) into an error that says what to do.

use std::ffi::OsString;
use std::fmt;
use std::io::IsTerminal;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::args::SshArgs;

/// The ssh program (tests may point `MESHCTL_SSH` at another).
fn ssh_program() -> OsString {
    std::env::var_os("MESHCTL_SSH").unwrap_or_else(|| "ssh".into())
}

/// `--ssh-option` keys that meshctl sets itself: host key checking and the control socket.
const RESERVED_OPTIONS: &[&str] = &[
    "stricthostkeychecking",
    "userknownhostsfile",
    "globalknownhostsfile",
    "knownhostscommand",
    "batchmode",
    "controlmaster",
    "controlpath",
    "controlpersist",
];

/// A machine to log in to: `[user@]host`, and a port when one was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The login user; `None`: ssh's default (its config, else the local user name).
    pub user: Option<String>,
    /// A host name, an address, or an alias of the user's ssh config.
    pub host: String,
    /// The port; `None`: ssh's default (its config, else 22).
    pub port: Option<u16>,
}

impl Target {
    /// Parses `[user@]host[:port]` (an IPv6 address with a port in brackets: `[::1]:2222`);
    /// `port` (from `--port`) must agree with a port in the text.
    pub fn parse(text: &str, port: Option<u16>) -> anyhow::Result<Self> {
        let text = text.trim();
        let (user, rest) = match text.rsplit_once('@') {
            Some((user, rest)) => (Some(user), rest),
            None => (None, text),
        };
        let (host, in_text) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) =
                inner.split_once(']').ok_or_else(|| anyhow!("{text:?}: an opening '[' without its ']'"))?;
            match after {
                "" => (host, None),
                _ => {
                    let port = after.strip_prefix(':').ok_or_else(|| anyhow!("{text:?}: expected :PORT after ']'"))?;
                    (host, Some(parse_port(port, text)?))
                }
            }
        } else if rest.matches(':').count() == 1 {
            let (host, port) = rest.split_once(':').unwrap_or((rest, ""));
            (host, Some(parse_port(port, text)?))
        } else {
            (rest, None)
        };
        if let Some(user) = user
            && (user.is_empty() || user.starts_with('-') || user.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            bail!("{text:?}: {user:?} is not a user name; write USER@HOST, e.g. root@203.0.113.10");
        }
        if host.is_empty() || host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("{text:?} names no host; write USER@HOST, e.g. root@203.0.113.10");
        }
        let port = match (in_text, port) {
            (Some(a), Some(b)) if a != b => bail!("{text:?} says port {a}, --port says {b}: give one"),
            (a, b) => a.or(b),
        };
        Ok(Self { user: user.map(str::to_owned), host: host.to_owned(), port })
    }

    /// Parses what [`Target::url`] wrote: `ssh://[user@]host[:port]`.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ssh://").ok_or_else(|| anyhow!("{url:?} is not an ssh:// address"))?;
        Self::parse(rest, None)
    }

    /// `ssh://[user@]host[:port]`, what the MeshNode's annotation records.
    pub fn url(&self) -> String {
        format!("ssh://{self}")
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match self.port {
            Some(port) if self.host.contains(':') => write!(f, "[{}]:{port}", self.host),
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

fn parse_port(port: &str, text: &str) -> anyhow::Result<u16> {
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => bail!("{text:?}: {port:?} is not a port (1-65535)"),
    }
}

/// Quotes `word` for a POSIX shell (the remote login shell that runs the command ssh sends).
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r#"'"'"'"#)) }
}

/// What went wrong, judged from ssh's messages (ssh exits 255 for all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No host key is recorded for the host.
    UnknownHostKey,
    /// The recorded host key differs from the one the host presented.
    ChangedHostKey,
    /// The server refused every key (or password) offered.
    Auth,
    /// No connection: no route, refused, timed out, unknown name.
    Unreachable,
    /// Anything else.
    Other,
}

/// Classifies ssh's stderr.
pub fn classify(stderr: &str) -> Failure {
    let has = |needle: &str| stderr.contains(needle);
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("Host key for") && has("has changed") {
        Failure::ChangedHostKey
    } else if has("Host key verification failed") || has("host key is known for") {
        Failure::UnknownHostKey
    } else if has("Permission denied")
        || has("Too many authentication failures")
        || has("No more authentication methods")
    {
        Failure::Auth
    } else if [
        "No route to host",
        "Connection refused",
        "Connection timed out",
        "Network is unreachable",
        "Could not resolve hostname",
        "Name or service not known",
        "Operation timed out",
        "Connection reset",
        "Connection closed by",
        "connect to host",
    ]
    .iter()
    .any(|n| has(n))
    {
        Failure::Unreachable
    } else {
        Failure::Other
    }
}

/// ssh's message without its noise (banners, warnings about added keys, blank lines).
pub fn gist(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_matches('@').trim())
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added") && !l.starts_with("**"))
        .collect();
    let text = lines.join("; ");
    if text.is_empty() { "ssh gave no message".to_owned() } else { text }
}

/// The first `SHA256:` fingerprint in ssh's message (the key a host presented).
pub fn fingerprint(stderr: &str) -> Option<String> {
    stderr
        .split(|c: char| c.is_whitespace() || c == '"')
        .find(|w| w.starts_with("SHA256:"))
        .map(|w| w.trim_end_matches('.').to_owned())
}

/// One logged-in connection to a machine, shared by every command sent to it.
pub struct Session {
    /// Where to.
    pub target: Target,
    /// Options of every ssh call (host key checking, identity, timeouts, the user's options).
    options: Vec<OsString>,
    /// The private directory of the control socket.
    control: tempfile::TempDir,
    /// Whether commands need `sudo -n` (the login user is not root).
    pub sudo: bool,
    /// The known_hosts file checked, for messages.
    known_hosts: String,
}

/// What a remote command reads on stdin.
pub enum Input<'a> {
    /// Nothing (`/dev/null`).
    Nothing,
    /// These bytes.
    Bytes(&'a [u8]),
    /// This local file.
    File(&'a Path),
}

impl Session {
    /// Logs in to `target` and keeps the connection for later commands. Fails with what to do
    /// when the host is unreachable, its key is unknown or changed, or authentication fails.
    pub async fn connect(target: &Target, args: &SshArgs) -> anyhow::Result<Self> {
        let interactive = std::io::stdin().is_terminal();
        let known_hosts =
            args.known_hosts.as_ref().map_or_else(|| "~/.ssh/known_hosts".to_owned(), |p| p.display().to_string());
        let options = options(target, args, interactive)?;
        let control = tempfile::Builder::new()
            .prefix("meshctl-ssh-")
            .tempdir()
            .context("cannot make a temporary directory for the SSH control socket")?;
        let session = Self { target: target.clone(), options, control, sudo: false, known_hosts };
        let log_path = session.control.path().join("master.log");
        let log = std::fs::File::create(&log_path).context("cannot create the SSH log file")?;
        // The master stays in the background after `true` (ControlPersist) and keeps `log` as its
        // stderr, so the status is awaited, not the end of its output.
        let mut command = Command::new(ssh_program());
        command
            .args(&session.options)
            .arg("-o")
            .arg("ControlMaster=yes")
            .arg("-o")
            .arg("ControlPersist=120")
            .arg("-o")
            .arg(session.control_path())
            .arg("--")
            .arg(&target.host)
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // Interactive logins may wait for a passphrase or a key touch.
        let limit = args.connect_timeout + if interactive { Duration::from_secs(300) } else { Duration::from_secs(20) };
        let status = match tokio::time::timeout(limit, command.status()).await {
            Ok(status) => status.map_err(|err| missing_ssh(&err))?,
            Err(_) => bail!(
                "cannot reach {target} over SSH: no answer within {} s. Check the address and port, and that \
                 sshd runs there; test with: ssh {}",
                limit.as_secs(),
                session.ssh_hint()
            ),
        };
        if status.success() {
            return Ok(session);
        }
        let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(session.explain(classify(&stderr), &stderr).await)
    }

    fn control_path(&self) -> OsString {
        let mut option = OsString::from("ControlPath=");
        option.push(self.control.path().join("socket"));
        option
    }

    /// The ssh command a person would run to try the same login.
    fn ssh_hint(&self) -> String {
        let mut words = Vec::new();
        if let Some(port) = self.target.port {
            words.push(format!("-p {port}"));
        }
        match &self.target.user {
            Some(user) => words.push(format!("{user}@{}", self.target.host)),
            None => words.push(self.target.host.clone()),
        }
        words.push("true".to_owned());
        words.join(" ")
    }

    /// The error for a failed login, saying what to do.
    async fn explain(&self, failure: Failure, stderr: &str) -> anyhow::Error {
        let target = &self.target;
        let said = gist(stderr);
        let host = &target.host;
        let port = target.port.unwrap_or(22);
        match failure {
            Failure::UnknownHostKey => {
                let offered = match offered_fingerprints(host, port).await {
                    Some(prints) if !prints.is_empty() => {
                        format!(" The host now offers (unverified): {}.", prints.join(", "))
                    }
                    _ => String::new(),
                };
                anyhow!(
                    "unknown host key: {known} has no key for {host}, so meshctl cannot tell that it is talking to \
                     the machine you mean (ssh said: {said}).{offered} Verify the key and add it: run \
                     `ssh-keyscan -p {port} {host} > host.keys`, compare `ssh-keygen -lf host.keys` with the \
                     fingerprint the machine itself shows (on its console: `ssh-keygen -lf \
                     /etc/ssh/ssh_host_ed25519_key.pub`), then `cat host.keys >> {known}` and run this again. \
                     (--accept-new-host-key trusts the first key seen instead: only on a network you trust.)",
                    known = self.known_hosts,
                )
            }
            Failure::ChangedHostKey => anyhow!(
                "the host key of {host} has CHANGED since it was recorded in {known}{presented}: someone may be \
                 intercepting the connection, or the machine was reinstalled. meshctl will not connect. If you know \
                 why it changed, remove the old key (`ssh-keygen -R {host} -f {known}`), verify the new one as for a \
                 new host, and run this again",
                known = self.known_hosts,
                presented = fingerprint(stderr).map(|f| format!(" (it now presents {f})")).unwrap_or_default(),
            ),
            Failure::Auth => anyhow!(
                "SSH authentication as {who} failed: the machine accepted none of the keys offered (ssh said: \
                 {said}). meshctl logs in with your ssh setup (ssh-agent, ~/.ssh/id_*, ~/.ssh/config) or the key \
                 given with --identity FILE: authorize a key on the machine (`ssh-copy-id -i KEY.pub {who}`), or \
                 pass the right one; test with: ssh {hint}",
                who = target_login(target),
                hint = self.ssh_hint(),
            ),
            Failure::Unreachable => anyhow!(
                "cannot reach {target} over SSH: {said}. Check the address and port (--port), that the machine \
                 is up and sshd runs there, and that no firewall is in the way; test with: ssh {hint}",
                hint = self.ssh_hint(),
            ),
            Failure::Other => anyhow!("ssh to {target} failed: {said}; test with: ssh {hint}", hint = self.ssh_hint()),
        }
    }

    /// Runs `script` with `sh -c` on the machine as the login user, `args` as `$1...`, and
    /// returns its stdout; fails with its stderr when it exits non-zero.
    pub async fn run_as_login(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        input: Input<'_>,
        limit: Duration,
    ) -> anyhow::Result<String> {
        self.exec(what, &shell_command(script, args), input, limit).await
    }

    /// Runs `script` as root: directly when logged in as root, else through `sudo -n`.
    pub async fn run_as_root(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        input: Input<'_>,
        limit: Duration,
    ) -> anyhow::Result<String> {
        let command = shell_command(script, args);
        let command = if self.sudo { format!("sudo -n {command}") } else { command };
        self.exec(what, &command, input, limit).await
    }

    async fn exec(&self, what: &str, command: &str, input: Input<'_>, limit: Duration) -> anyhow::Result<String> {
        let mut child = Command::new(ssh_program())
            .args(&self.options)
            .arg("-o")
            .arg("ControlMaster=no")
            .arg("-o")
            .arg(self.control_path())
            .arg("--")
            .arg(&self.target.host)
            .arg(command)
            .stdin(if matches!(input, Input::Nothing) { Stdio::null() } else { Stdio::piped() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| missing_ssh(&err))?;
        let stdin = child.stdin.take();
        let feed = async move {
            let Some(mut stdin) = stdin else { return anyhow::Ok(()) };
            match input {
                Input::Nothing => {}
                Input::Bytes(bytes) => stdin.write_all(bytes).await?,
                Input::File(path) => {
                    let mut file =
                        tokio::fs::File::open(path).await.with_context(|| format!("cannot read {}", path.display()))?;
                    tokio::io::copy(&mut file, &mut stdin).await?;
                }
            }
            stdin.shutdown().await?;
            anyhow::Ok(())
        };
        let run = async { tokio::join!(feed, child.wait_with_output()) };
        let (fed, output) = tokio::time::timeout(limit, run)
            .await
            .map_err(|_| anyhow!("{what} on {}: no answer within {} s", self.target, limit.as_secs()))?;
        let output = output.with_context(|| format!("{what} on {}: running ssh", self.target))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        match output.status.code() {
            Some(0) => {
                fed.with_context(|| format!("{what} on {}: sending the input", self.target))?;
                Ok(stdout)
            }
            Some(255) => Err(self.explain(classify(&stderr), &stderr).await.context(format!("{what} failed"))),
            code => bail!(
                "{what} on {} failed (exit {}): {}",
                self.target,
                code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
                last_lines(&format!("{stderr}{stdout}"), 15)
            ),
        }
    }

    /// Ends the master connection (also done on drop).
    pub fn close(&self) {
        let _ = std::process::Command::new(ssh_program())
            .arg("-o")
            .arg(self.control_path())
            .args(["-O", "exit", "--"])
            .arg(&self.target.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

fn target_login(target: &Target) -> String {
    match &target.user {
        Some(user) => format!("{user}@{}", target.host),
        None => target.host.clone(),
    }
}

/// `sh -c 'script' sh 'arg'...`, for the remote login shell.
fn shell_command(script: &str, args: &[&str]) -> String {
    let mut words = vec!["sh".to_owned(), "-c".to_owned(), quote(script), "sh".to_owned()];
    words.extend(args.iter().map(|a| quote(a)));
    words.join(" ")
}

/// The last `n` non-empty lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let text = lines[lines.len().saturating_sub(n)..].join("\n");
    if text.is_empty() { "(no output)".to_owned() } else { text }
}

fn missing_ssh(err: &std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow!(
            "the OpenSSH client `ssh` is not installed (or not on PATH): install it (Debian: apt-get install \
             openssh-client)"
        )
    } else {
        anyhow!("cannot run ssh: {err}")
    }
}

/// The options of every ssh call.
fn options(target: &Target, args: &SshArgs, interactive: bool) -> anyhow::Result<Vec<OsString>> {
    let mut out: Vec<OsString> = vec!["-T".into()];
    let mut option = |text: String| {
        out.push("-o".into());
        out.push(text.into());
    };
    if !interactive {
        option("BatchMode=yes".to_owned());
    }
    let checking = if args.accept_new_host_key { "accept-new" } else { "yes" };
    option(format!("StrictHostKeyChecking={checking}"));
    if let Some(file) = &args.known_hosts {
        option(format!("UserKnownHostsFile={}", ssh_path(file)?));
    }
    option(format!("ConnectTimeout={}", args.connect_timeout.as_secs().max(1)));
    option("ServerAliveInterval=15".to_owned());
    option("ServerAliveCountMax=4".to_owned());
    if let Some(identity) = &args.identity {
        option(format!("IdentityFile={}", ssh_path(identity)?));
        option("IdentitiesOnly=yes".to_owned());
    }
    for extra in &args.ssh_options {
        let key = extra.split(['=', ' ', '\t']).next().unwrap_or_default().to_ascii_lowercase();
        if RESERVED_OPTIONS.contains(&key.as_str()) {
            bail!(
                "--ssh-option {extra:?}: meshctl sets {key} itself (host keys are always checked: use --known-hosts \
                 FILE, or --accept-new-host-key for a machine seen for the first time)"
            );
        }
        option(extra.clone());
    }
    if let Some(port) = target.port {
        out.push("-p".into());
        out.push(port.to_string().into());
    }
    if let Some(user) = &target.user {
        out.push("-l".into());
        out.push(user.into());
    }
    Ok(out)
}

/// A path as an ssh_config value (quoted when it has spaces).
fn ssh_path(path: &Path) -> anyhow::Result<String> {
    let text = path.to_str().ok_or_else(|| anyhow!("{} is not valid UTF-8", path.display()))?;
    if text.contains('"') {
        bail!("{text:?}: ssh cannot take a path with '\"' in it");
    }
    Ok(if text.contains(char::is_whitespace) { format!("\"{text}\"") } else { text.to_owned() })
}

/// The fingerprints of the host keys `host` offers now (ssh-keyscan | ssh-keygen -lf -), for an
/// unknown-host-key message; `None` if they cannot be had within a few seconds.
async fn offered_fingerprints(host: &str, port: u16) -> Option<Vec<String>> {
    let scan = Command::new("ssh-keyscan")
        .args(["-T", "3", "-p", &port.to_string(), "--", host])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let keys = tokio::time::timeout(Duration::from_secs(5), scan).await.ok()?.ok()?.stdout;
    if keys.is_empty() {
        return None;
    }
    let mut keygen = Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut stdin = keygen.stdin.take()?;
    stdin.write_all(&keys).await.ok()?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(5), keygen.wait_with_output()).await.ok()?.ok()?;
    // "256 SHA256:abc... 192.168.77.200 (ED25519)" -> "ED25519 SHA256:abc..."
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let print = words.get(1)?;
                let kind = words.last()?.trim_matches(['(', ')']);
                Some(format!("{kind} {print}"))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        let t = Target::parse("root@192.168.77.5", None).unwrap();
        assert_eq!(t, Target { user: Some("root".into()), host: "192.168.77.5".into(), port: None });
        assert_eq!(t.url(), "ssh://root@192.168.77.5");
        let t = Target::parse("admin@edge.example.org:2222", None).unwrap();
        assert_eq!(t.port, Some(2222));
        assert_eq!(t.to_string(), "admin@edge.example.org:2222");
        let t = Target::parse("root@[2001:db8::1]:22", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("2001:db8::1", Some(22)));
        assert_eq!(t.url(), "ssh://root@[2001:db8::1]:22");
        assert_eq!(Target::from_url(&t.url()).unwrap(), t);
        let t = Target::parse("root@2001:db8::1", Some(2200)).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("2001:db8::1", Some(2200)));
        let alias = Target::parse("edge-box", None).unwrap();
        assert_eq!((alias.user.clone(), alias.to_string()), (None, "edge-box".to_owned()));
        assert_eq!(Target::parse("root@host", Some(2222)).unwrap().url(), "ssh://root@host:2222");
    }

    #[test]
    fn bad_targets_say_why() {
        for bad in ["", "root@", "@host", "-oProxyCommand=x", "root@-evil", "ro ot@host", "root@host:0", "root@[::1"] {
            assert!(Target::parse(bad, None).is_err(), "{bad:?} was accepted");
        }
        let conflict = Target::parse("root@host:22", Some(2222)).unwrap_err().to_string();
        assert!(conflict.contains("port 22") && conflict.contains("2222"), "{conflict}");
        assert!(Target::from_url("root@host").is_err());
    }

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(quote("/usr/local/bin/mesh-agent"), "/usr/local/bin/mesh-agent");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r#"'it'"'"'s'"#);
        assert_eq!(shell_command("echo \"$1\"", &["x y"]), r#"sh -c 'echo "$1"' sh 'x y'"#);
    }

    #[test]
    fn ssh_failures_are_told_apart() {
        let unknown = "No ED25519 host key is known for 192.168.77.200 and you have requested strict checking.\r\n\
                       Host key verification failed.\r\n";
        assert_eq!(classify(unknown), Failure::UnknownHostKey);
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
                       @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
                       Host key verification failed.\n";
        assert_eq!(classify(changed), Failure::ChangedHostKey);
        let presented = "The fingerprint for the ED25519 key sent by the remote host is\nSHA256:lPg0odIOJmV+jim09.\n";
        assert_eq!(fingerprint(presented).as_deref(), Some("SHA256:lPg0odIOJmV+jim09"));
        assert_eq!(fingerprint(changed), None);
        assert_eq!(classify("root@192.168.77.200: Permission denied (publickey).\r\n"), Failure::Auth);
        assert_eq!(classify("ssh: connect to host 192.168.77.250 port 22: No route to host\r\n"), Failure::Unreachable);
        assert_eq!(classify("ssh: connect to host 10.0.0.1 port 22: Connection refused"), Failure::Unreachable);
        assert_eq!(classify("ssh: Could not resolve hostname nope: Name or service not known"), Failure::Unreachable);
        assert_eq!(classify("something new"), Failure::Other);
        assert_eq!(
            gist(unknown),
            "No ED25519 host key is known for 192.168.77.200 and you have requested strict checking.; Host key \
             verification failed."
        );
        assert_eq!(gist(""), "ssh gave no message");
    }

    #[test]
    fn host_key_checking_cannot_be_turned_off() {
        let target = Target::parse("root@h", Some(2222)).unwrap();
        let mut args = SshArgs {
            known_hosts: Some(PathBuf::from("/tmp/my hosts")),
            accept_new_host_key: false,
            identity: Some(PathBuf::from("/k/id")),
            ssh_options: vec!["ProxyJump=bastion".into()],
            connect_timeout: Duration::from_secs(7),
        };
        let text: Vec<String> =
            options(&target, &args, false).unwrap().iter().map(|o| o.to_string_lossy().into_owned()).collect();
        let joined = text.join(" ");
        for want in [
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o UserKnownHostsFile=\"/tmp/my hosts\"",
            "-o ConnectTimeout=7",
            "-o IdentityFile=/k/id -o IdentitiesOnly=yes",
            "-o ProxyJump=bastion",
            "-p 2222 -l root",
        ] {
            assert!(joined.contains(want), "{want:?} missing from {joined}");
        }
        args.accept_new_host_key = true;
        let joined: Vec<String> =
            options(&target, &args, true).unwrap().iter().map(|o| o.to_string_lossy().into_owned()).collect();
        assert!(joined.contains(&"StrictHostKeyChecking=accept-new".to_owned()));
        assert!(!joined.contains(&"BatchMode=yes".to_owned()));
        args.ssh_options = vec!["StrictHostKeyChecking=no".into()];
        let err = options(&target, &args, false).unwrap_err().to_string();
        assert!(err.contains("host keys are always checked"), "{err}");
        args.ssh_options = vec!["userknownhostsfile /dev/null".into()];
        assert!(options(&target, &args, false).is_err());
    }

    #[test]
    fn last_lines_keep_the_end() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("", 3), "(no output)");
    }
}
