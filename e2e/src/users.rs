//! Lab users other than the admin: a client certificate signed by the lab's CA
//! (`.lab/pki/ca.{crt,key}`, made with the openssl CLI) whose CN is the user name and whose O
//! entries are its groups, as the API server reads them. What such a user may do is what the
//! chart's RBAC and admission policies let them do: the tests of `meshctl connect` and of its
//! policies act as `alice` and `bob` in the group `harness-mesh:connect`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::repo_root;

/// The group the chart binds its `<release>-connect` role to by default.
pub const CONNECT_GROUP: &str = "harness-mesh:connect";

/// A lab user's kubeconfig, written under `dir`.
pub struct LabUser {
    /// The user name (the certificate's CN).
    pub name: String,
    /// The kubeconfig file (mode 0644: lab credentials, readable by the unprivileged uid that
    /// runs `meshctl connect` in the tests).
    pub kubeconfig: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("running openssl")?;
    ensure!(out.status.success(), "openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

impl LabUser {
    /// Makes user `name` in `groups`, with a kubeconfig for the API server at `server` (as seen
    /// from where the kubeconfig is used: `https://127.0.0.1:<port>` in a node, through its relay).
    pub fn new(name: &str, groups: &[&str], server: &str, dir: &Path) -> anyhow::Result<Self> {
        let pki = repo_root().join(".lab/pki");
        ensure!(
            pki.join("ca.key").exists(),
            "lab users are signed with the lab's CA ({}/ca.key), which this cluster lacks: run on the lab",
            pki.display()
        );
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let subject: String =
            std::iter::once(format!("/CN={name}")).chain(groups.iter().map(|g| format!("/O={g}"))).collect();
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        openssl(&["genpkey", "-quiet", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key], dir)?;
        openssl(&["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr], dir)?;
        let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
        let (ca_crt, ca_key) = (ca_crt.to_string_lossy(), ca_key.to_string_lossy());
        // Extensions make it an X.509 v3 certificate, the only version rustls accepts.
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )?;
        let serial = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos().to_string();
        openssl(
            &["x509", "-req", "-in", &csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-set_serial", &serial, "-days", "2"]
                .into_iter()
                .chain(["-extfile", ext.as_str(), "-out", crt.as_str()])
                .collect::<Vec<_>>(),
            dir,
        )?;
        let b64 = |path: &Path| -> anyhow::Result<String> {
            use base64::Engine as _;
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    \
             certificate-authority-data: {}\nusers:\n- name: {name}\n  user:\n    client-certificate-data: {}\n    \
             client-key-data: {}\ncontexts:\n- name: {name}\n  context: {{cluster: lab, user: {name}}}\n\
             current-context: {name}\n",
            b64(&pki.join("ca.crt"))?,
            b64(&dir.join(&crt))?,
            b64(&dir.join(&key))?,
        );
        let path = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { name: name.to_owned(), kubeconfig: path })
    }

    /// A client with this user's credentials, for the API server at `server` (from the test
    /// process: the admin kubeconfig's).
    pub async fn client(&self, server: &str) -> anyhow::Result<Client> {
        let mut config = Kubeconfig::read_from(&self.kubeconfig)?;
        for cluster in &mut config.clusters {
            if let Some(c) = cluster.cluster.as_mut() {
                c.server = Some(server.to_owned());
            }
        }
        let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

/// The API server URL a kubeconfig names (its first cluster's).
pub fn server_of(kubeconfig: &Path) -> anyhow::Result<String> {
    let config = Kubeconfig::read_from(kubeconfig)?;
    config
        .clusters
        .iter()
        .find_map(|c| c.cluster.as_ref()?.server.clone())
        .with_context(|| format!("{} names no API server", kubeconfig.display()))
}
