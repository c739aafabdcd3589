//! Steps 2 and 3 of both enroll and unenroll: log in to the machine over SSH, and make sure
//! commands can run there as root.

use anyhow::bail;

use super::args::SshArgs;
use super::local::secs;
use super::progress::Progress;
use super::ssh::{Input, Session, Target};

/// Step 2: logs in to `target` with the system `ssh` (host key checked against `--known-hosts`,
/// else ssh's own known_hosts) and keeps the connection for the later steps.
///
/// On failure nothing has been changed, on the machine or in the cluster; the error says what to
/// do (verify an unknown host key, authorize a key, check the address).
pub async fn connect(progress: &mut Progress, target: &Target, ssh: &SshArgs) -> anyhow::Result<Session> {
    let known = ssh.known_hosts.as_ref().map_or_else(|| "~/.ssh/known_hosts".to_owned(), |p| p.display().to_string());
    progress.start(format!("connecting to {target} (host key checked against {known})"));
    progress
        .run(async {
            let session = Session::connect(target, ssh).await?;
            Ok((session, String::new()))
        })
        .await
}

/// What step 3 runs as the login user: its uid and, when it is not root, whether `sudo -n` works.
const CHECK_PRIVILEGES: &str = r#"echo "uid=$(id -u)"
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then echo sudo=missing
  elif sudo -n true >/dev/null 2>&1; then echo sudo=yes
  else echo sudo=password; fi
fi
"#;

/// Step 3: root, or passwordless sudo; sets whether the session's later commands go through
/// `sudo -n`.
///
/// Only looks: on failure nothing has been changed anywhere, and the error says how to get root
/// (log in as root, or a sudoers line).
pub async fn check_privileges(progress: &mut Progress, session: &mut Session) -> anyhow::Result<()> {
    progress.start("checking privileges");
    let sudo = progress
        .run(async {
            let out =
                session.run_as_login("checking privileges", CHECK_PRIVILEGES, &[], Input::Nothing, secs(30)).await?;
            judge_privileges(&out, &session.target)
        })
        .await?;
    session.sudo = sudo;
    Ok(())
}

/// Reads [`CHECK_PRIVILEGES`]' output: whether commands need sudo, and who runs them; an error
/// when the login user can get root neither way.
fn judge_privileges(out: &str, target: &Target) -> anyhow::Result<(bool, String)> {
    let value = |key: &str| out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_default().to_owned();
    let who = target.user.clone().unwrap_or_else(|| "the login user".to_owned());
    if value("uid=") == "0" {
        return Ok((false, "root".to_owned()));
    }
    let host = &target.host;
    let fix = format!(
        "log in as root (root@{host}), or give {who} passwordless sudo on the machine (a line `{who} ALL=(ALL) \
         NOPASSWD: ALL` in /etc/sudoers.d/harness-mesh)"
    );
    match value("sudo=").as_str() {
        "yes" => Ok((true, format!("{who} with passwordless sudo"))),
        "password" => bail!("missing root: {who} on {host} is not root and sudo asks for a password; {fix}"),
        _ => bail!("missing root: {who} on {host} is not root and has no sudo; {fix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_or_passwordless_sudo() {
        let admin = Target::parse("admin@edge", None).unwrap();
        assert_eq!(judge_privileges("uid=0\n", &admin).unwrap(), (false, "root".to_owned()));
        assert_eq!(
            judge_privileges("uid=1000\nsudo=yes\n", &admin).unwrap(),
            (true, "admin with passwordless sudo".to_owned())
        );
        let password = judge_privileges("uid=1000\nsudo=password\n", &admin).unwrap_err().to_string();
        assert!(password.starts_with("missing root: admin on edge is not root and sudo asks for a password"));
        assert!(password.contains("`admin ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/harness-mesh"), "{password}");
        let none = judge_privileges("uid=1000\nsudo=missing\n", &admin).unwrap_err().to_string();
        assert!(none.starts_with("missing root: admin on edge is not root and has no sudo"), "{none}");
        let alias = Target::parse("edge", None).unwrap();
        let err = judge_privileges("", &alias).unwrap_err().to_string();
        assert!(err.contains("the login user on edge is not root"), "{err}");
    }

    #[test]
    fn the_check_is_valid_sh() {
        let out = std::process::Command::new("sh").args(["-n", "-c", CHECK_PRIVILEGES]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!CHECK_PRIVILEGES.contains('\''), "sent inside single quotes");
    }
}
