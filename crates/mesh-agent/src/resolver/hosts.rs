//! `--resolver hosts`: the managed block in a hosts file (`/etc/hosts`, or `--hosts-file`),
//! written only when its text changes. The block's text is `mesh_dataplane::hosts`'s; here is
//! the file I/O.
//!
//! A write goes to a temporary file in the same directory, which then replaces the file by
//! rename, so a reader sees the old file or the new one, never half of one. Where the file is a
//! mount point (a container's `/etc/hosts`, a hostPath mount, `ip netns exec`'s bind mount of
//! `/etc/netns/NAME/hosts`) rename cannot replace it (EBUSY, EXDEV): the file is then truncated
//! and written in place, one `write` of the whole text, which a reader may catch half done.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh_dataplane::hosts;

/// What [`HostsFile::stamp`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    /// The inode's change time: moved by every write, and not settable by users (unlike the
    /// modification time, which `touch -r`, `cp -p` or `rsync -t` set).
    changed: (i64, i64),
}

/// One hosts file.
#[derive(Clone, Debug)]
pub struct HostsFile {
    pub path: PathBuf,
}

impl HostsFile {
    /// Puts `block` (empty: none) into the file; false when the file already had it.
    pub fn apply(&self, block: &str) -> anyhow::Result<bool> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && block.is_empty() => return Ok(false),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("reading {} (--resolver hosts needs to read and write it)", self.path.display())
                });
            }
        };
        let wanted = hosts::splice(&text, block);
        if wanted == text {
            return Ok(false);
        }
        write(&self.path, &wanted)?;
        Ok(true)
    }

    /// The file's identity, size and change time, read with one `stat`: the same stamp as
    /// right after the agent's last write means nobody has written the file since (a resync then
    /// need not read it back).
    pub fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.path).ok()?;
        Some(Stamp {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Takes the block out; false when there was none.
    pub fn remove(&self) -> anyhow::Result<bool> {
        self.apply("")
    }
}

/// Replaces `path`'s content with `text`: by rename where it can, else in place.
fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "hosts".into());
    let temp = dir.join(format!(".{name}.harness-mesh.tmp"));
    match replace_by_rename(path, &temp, text) {
        Ok(()) => Ok(()),
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            tracing::debug!("replacing {} by rename failed ({err:#}); writing it in place", path.display());
            // A mount point (bind-mounted file) cannot be renamed over: truncate and write.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .create(true)
                .open(path)
                .with_context(|| format!("opening {} for writing (the agent must run as root)", path.display()))?;
            file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
            file.sync_all().with_context(|| format!("syncing {}", path.display()))
        }
    }
}

fn replace_by_rename(path: &Path, temp: &Path, text: &str) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
    let mut file = std::fs::File::create(temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(text.as_bytes())?;
    std::fs::set_permissions(temp, std::os::unix::fs::PermissionsExt::from_mode(mode.unwrap_or(0o644)))?;
    file.sync_all()?;
    std::fs::rename(temp, path).with_context(|| format!("renaming {} to {}", temp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(name: &str) -> String {
        let records = [(name.to_owned(), vec![std::net::Ipv4Addr::new(10, 42, 3, 4)])].into_iter().collect();
        hosts::render(&records)
    }

    #[test]
    fn writes_only_on_change_keeps_the_rest_and_removes_its_block() {
        let dir = std::env::temp_dir().join(format!("hm-hosts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        let original = "127.0.0.1\tlocalhost\n# a comment\n192.168.1.1 router\n";
        std::fs::write(&path, original).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let file = HostsFile { path: path.clone() };
        assert!(file.apply(&block("a.mesh.local")).unwrap());
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written, format!("{original}{}", block("a.mesh.local")));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o644, "the mode is kept");
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        assert!(!file.apply(&block("a.mesh.local")).unwrap(), "same names: no write");
        assert_eq!(inode, std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()));
        assert!(file.apply(&block("b.mesh.local")).unwrap());
        assert!(std::fs::read_to_string(&path).unwrap().contains("b.mesh.local"));
        assert!(file.remove().unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original, "as it was");
        assert!(!file.remove().unwrap());
        assert!(!dir.join(".hosts.harness-mesh.tmp").exists(), "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_stamp_moves_when_anyone_writes_the_file() {
        let dir = std::env::temp_dir().join(format!("hm-hosts-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, "127.0.0.1\tlocalhost\n").unwrap();
        let file = HostsFile { path: path.clone() };
        assert!(file.apply(&block("a.mesh.local")).unwrap());
        let stamp = file.stamp().unwrap();
        assert_eq!(file.stamp(), Some(stamp), "nothing written: the same stamp");
        // Someone edits the block by hand, in place (same inode, same size), and sets the
        // modification time back: the change time still moves.
        let text = std::fs::read_to_string(&path).unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, text.replace("a.mesh.local", "b.mesh.local")).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), text.len() as u64);
        assert_ne!(file.stamp(), Some(stamp));
        assert!(file.apply(&block("a.mesh.local")).unwrap(), "put back");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(file.stamp(), None, "no file, no stamp");
    }

    #[test]
    fn a_missing_file_stays_missing_when_there_is_nothing_to_write() {
        let file = HostsFile { path: std::env::temp_dir().join(format!("hm-no-hosts-{}", std::process::id())) };
        assert!(!file.remove().unwrap());
        assert!(!file.path.exists());
    }
}
