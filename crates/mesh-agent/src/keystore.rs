//! The node's WireGuard identity on disk: `<state-dir>/private.key`, base64, mode 0600, in a
//! 0700 directory. Created on first start, read on every later one, so a restarted agent keeps
//! its key (and with it its peers' trust). The key never leaves this file and the device.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh_wireguard::PrivateKey;

/// The key file's name inside the state dir.
pub const KEY_FILE: &str = "private.key";

/// Reads the key in `state_dir`, or creates it (and the directory) on first start. Refuses a
/// key file that others can read, as wg(8) warns about.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<PrivateKey> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by others (mode {mode:o}): the private key may have leaked; \
                     chmod 600 it if you are sure it did not, or delete it to make a new identity",
                    path.display()
                );
            }
            PrivateKey::from_base64(&text)
                .with_context(|| format!("{} holds no valid key; delete it to make a new identity", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate().context("reading the system's random source")?;
            write_new(&path, &key)?;
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new WireGuard key pair");
            Ok(key)
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the key to a temporary file created 0600 and renames it into place, so a crash never
/// leaves a half-written key.
fn write_new(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(key.to_base64().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("moving the new key to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-agent-keystore-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_key_is_created_once_private_and_kept() {
        let dir = temp_dir("kept");
        let first = load_or_create(&dir.join("state")).unwrap();
        let path = dir.join("state").join(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(dir.join("state")).unwrap().permissions().mode() & 0o777, 0o700);
        let second = load_or_create(&dir.join("state")).unwrap();
        assert_eq!(first, second);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_readable_or_broken_key_file_is_refused_with_advice() {
        let dir = temp_dir("refused");
        load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not a key").unwrap();
        let err = format!("{:#}", load_or_create(&dir).unwrap_err());
        assert!(err.contains("delete it"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
