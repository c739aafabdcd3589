//! What enroll and unenroll work out on this computer, without the cluster or the machine: the
//! node name's grammar, the agent binary (where, which CPU, its checksum), and how hashes, sizes,
//! dates and durations read in progress lines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

use super::remote;

/// Fails unless `name` is a DNS label (it becomes `NAME.node.mesh.local` and `mesh-agent-NAME`).
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        bail!(
            "{name:?} is not a valid node name: use 1-63 lowercase letters, digits and '-', starting and ending with a \
             letter or digit (it becomes {name}.node.mesh.local)"
        )
    }
}

/// Whether `url`'s host is a loopback name or address.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `--agent-binary`, else `mesh-agent` next to the running meshctl.
pub fn agent_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("cannot tell where meshctl is, to find mesh-agent next to it")?;
            exe.with_file_name("mesh-agent")
        }
    };
    if !path.is_file() {
        bail!(
            "no agent binary at {}: build it (cargo build --release -p mesh-agent) and pass it with --agent-binary \
             PATH (the default is mesh-agent next to meshctl)",
            path.display()
        );
    }
    Ok(path)
}

/// The CPUs (`uname -m` names) the binary runs on.
pub fn binary_arch(path: &Path) -> anyhow::Result<&'static [&'static str]> {
    let mut header = [0u8; 64];
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = std::io::Read::read(&mut file, &mut header).with_context(|| format!("cannot read {}", path.display()))?;
    remote::elf_arch(&header[..n]).ok_or_else(|| {
        anyhow!(
            "{} is not a Linux executable (no ELF header): pass the mesh-agent binary with --agent-binary",
            path.display()
        )
    })
}

/// Checks the `sha256sum` line WRITE_FILE printed.
pub fn verify_written(out: &str, want: &str, path: &str) -> anyhow::Result<()> {
    let got = out.split_whitespace().next().unwrap_or_default();
    if got == want {
        Ok(())
    } else {
        bail!(
            "{path} on the machine has SHA-256 {got:?} after writing, not {want}: the copy was damaged; run enroll \
             again"
        )
    }
}

/// The SHA-256 of `bytes`, in hex (as `sha256sum` prints it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of the file at `path`, in hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Bytes in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A size for progress lines: `233 MB`.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// Unix seconds for progress lines: `2026-01-09 14:02 UTC`.
pub fn unix_date(seconds: i64) -> String {
    Timestamp::from_second(seconds)
        .map_or_else(|_| seconds.to_string(), |t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
}

/// `n` seconds.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        for good in ["edge-1", "a", "x1", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Edge", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("not a valid node name"), "{bad}: {err}");
        }
    }

    #[test]
    fn loopback_api_servers_are_noticed() {
        assert!(is_loopback_url("https://127.0.0.1:16443"));
        assert!(is_loopback_url("https://localhost:6443/"));
        assert!(is_loopback_url("https://[::1]:6443"));
        assert!(!is_loopback_url("https://10.0.0.1:6443"));
        assert!(!is_loopback_url("https://k8s.example.org"));
    }

    #[test]
    fn hashes_and_sizes_read_well() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(megabytes(233_052_280), "233 MB");
        assert_eq!(unix_date(0), "1970-01-01 00:00 UTC");
        assert!(verify_written("ab  /x\n", "ab", "/x").is_ok());
        assert!(verify_written("", "ab", "/x").unwrap_err().to_string().contains("damaged"));
    }

    #[test]
    fn the_agent_binary_must_be_an_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("mesh-agent");
        let err = agent_binary(Some(&missing)).unwrap_err().to_string();
        assert!(err.starts_with(&format!("no agent binary at {}", missing.display())), "{err}");
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\necho not an agent\n").unwrap();
        assert_eq!(agent_binary(Some(&script)).unwrap(), script);
        let err = binary_arch(&script).unwrap_err().to_string();
        assert!(err.contains("is not a Linux executable (no ELF header)"), "{err}");
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[5] = 1;
        header[18] = 0xb7;
        let elf = dir.path().join("elf");
        std::fs::write(&elf, &header).unwrap();
        assert!(binary_arch(&elf).unwrap().contains(&"aarch64"));
        assert_eq!(sha256_file(&script).unwrap(), sha256_hex(b"#!/bin/sh\necho not an agent\n"));
    }
}
