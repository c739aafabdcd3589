//! How meshctl reaches the cluster: the kubectl-like flags ([`ClusterArgs`]) and the one
//! kubeconfig loader ([`connect`]) that every command uses, read-only ones and enroll alike.
//! Depends on nothing of meshctl but [`crate::util`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use base64::Engine;
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::util::{chain, parse_duration, root_cause};

/// How to reach the cluster: the kubectl flags of the same names.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterArgs {
    /// The kubeconfig file [default: $KUBECONFIG, else ~/.kube/config, else in-cluster]
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use [default: its current-context]
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,

    /// Give up on the API server after this long (e.g. 10s, 1m)
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// The namespace harness-mesh is installed in: the agents' liveness Leases are read there
    /// only, so a Lease someone else names mesh-agent-<node> in another namespace cannot make a
    /// dead agent look alive
    #[arg(
        long,
        global = true,
        value_name = "NAMESPACE",
        env = "MESHCTL_MESH_NAMESPACE",
        default_value = "harness-mesh"
    )]
    pub mesh_namespace: String,
}

/// A client for the cluster, and what the kubeconfig says about how to reach it (enroll hands
/// the API server URL and its CA on to the machine it enrolls).
pub struct Connection {
    /// A client with the user's credentials, its timeouts set to `--request-timeout`.
    pub client: Client,
    /// The API server URL as kube prints it (`https://host:port/`).
    pub url: String,
    /// The API server URL without a trailing `/`, as the machines enroll gets it.
    pub server: String,
    /// The kubeconfig context used, if any.
    pub context: Option<String>,
    /// The kubeconfig's CA bundle (PEM), if it names one.
    pub ca_pem: Option<String>,
    /// Whether the kubeconfig turns TLS verification off.
    pub insecure: bool,
}

impl Connection {
    /// `https://host:port/ (context NAME)`: the cluster as the messages of status, graph and
    /// showconf have always named it.
    pub fn target(&self) -> String {
        describe(&self.url, self.context.as_deref())
    }

    /// `https://host:port (context NAME)`: the cluster as enroll's and unenroll's progress lines
    /// and messages name it, by the URL the machine gets.
    pub fn server_target(&self) -> String {
        describe(&self.server, self.context.as_deref())
    }
}

/// Builds a client from `--kubeconfig`/`--context` or, without them, as kubectl does:
/// `$KUBECONFIG` (a list of files, merged), else `~/.kube/config`, else the in-cluster service
/// account. Contacts nothing: the first request finds out whether the cluster is there.
pub async fn connect(args: &ClusterArgs) -> anyhow::Result<Connection> {
    let options = KubeConfigOptions { context: args.context.clone(), ..KubeConfigOptions::default() };
    let kubeconfig = match &args.kubeconfig {
        Some(path) => Some(
            Kubeconfig::read_from(path)
                .map_err(|err| anyhow!("cannot read the kubeconfig {}: {}", path.display(), root_cause(&err)))?,
        ),
        None => match Kubeconfig::read() {
            Ok(kubeconfig) => Some(kubeconfig),
            Err(err) if args.context.is_some() => {
                bail!("cannot read a kubeconfig to find context {:?} in: {err}", args.context.as_deref().unwrap_or(""))
            }
            Err(_) => None,
        },
    };
    let (mut config, context) = match kubeconfig {
        Some(kubeconfig) => {
            if let Some(wanted) = &args.context {
                check_context(&kubeconfig, wanted)?;
            }
            let context = args.context.clone().or_else(|| kubeconfig.current_context.clone());
            let config = Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|err| {
                anyhow!(
                    "the kubeconfig cannot be used: {}; choose a context with --context or fix the file",
                    chain(&err)
                )
            })?;
            (config, context)
        }
        None => match Config::incluster() {
            Ok(config) => (config, None),
            Err(_) => bail!(
                "no kubeconfig found: meshctl reads it the way kubectl does, from --kubeconfig FILE, else \
                 $KUBECONFIG, else ~/.kube/config (or the in-cluster service account). Point one of them at \
                 your cluster"
            ),
        },
    };
    config.connect_timeout = Some(args.request_timeout);
    config.read_timeout = Some(args.request_timeout);
    config.write_timeout = Some(args.request_timeout);
    let url = config.cluster_url.to_string();
    let server = url.trim_end_matches('/').to_owned();
    let ca_pem = config.root_cert.as_ref().filter(|certs| !certs.is_empty()).map(|certs| pem(certs));
    let insecure = config.accept_invalid_certs;
    let client = Client::try_from(config)
        .map_err(|err| anyhow!("cannot set up a client for {}: {}", describe(&url, context.as_deref()), chain(&err)))?;
    Ok(Connection { client, url, server, context, ca_pem, insecure })
}

/// Fails unless the kubeconfig has the context `wanted`, listing the ones it has.
fn check_context(kubeconfig: &Kubeconfig, wanted: &str) -> anyhow::Result<()> {
    if kubeconfig.contexts.iter().any(|c| c.name == wanted) {
        return Ok(());
    }
    let known: Vec<&str> = kubeconfig.contexts.iter().map(|c| c.name.as_str()).collect();
    bail!(
        "the kubeconfig has no context {wanted:?}; it has: {} (`kubectl config get-contexts` lists them)",
        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
    )
}

/// `URL (context NAME)`: the API server as messages name it.
fn describe(server: &str, context: Option<&str>) -> String {
    match context {
        Some(context) => format!("{server} (context {context})"),
        None => server.to_owned(),
    }
}

/// DER certificates as one PEM bundle.
pub fn pem(certs: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in certs {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in text.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA (openssl req -x509, P-256), so that the client accepts it.
    const TEST_CA: &str = "\
-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUfI8nGtRlNktt0+TrkWMW2JR+seswCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPbWVzaGN0bC10ZXN0LWNhMCAXDTI2MTIwMjEzNDIwMloYDzIx
MjYxMTA4MTM0MjAyWjAaMRgwFgYDVQQDDA9tZXNoY3RsLXRlc3QtY2EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAATbCF8oyRNqX7SQOd9rbSSXZ1Hc+5K1mzbJ4rQj
hKmpX1uw59FbPRcNMRHXdzE0onsxcO7g5XPnYbb8KXhETRnUo1MwUTAdBgNVHQ4E
FgQU6rBmRuW2qZYQlsAT0vZPQuxcXJYwHwYDVR0jBBgwFoAU6rBmRuW2qZYQlsAT
0vZPQuxcXJYwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiA+JMMt
2ggzst9JDhV5oxcUOy1UZ07niSNNPuSlTj7hzAIgIFbD40YOYkoOoW1q2KS5OmUW
IYB5HJ6rhrb8j4co3Vw=
-----END CERTIFICATE-----
";

    const KUBECONFIG: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://127.0.0.1:6443/
    certificate-authority-data: CA
- name: open
  cluster:
    server: https://10.0.0.1:6443
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: secret
contexts:
- name: lab
  context: {cluster: lab, user: admin}
- name: open
  context: {cluster: open, user: admin}
current-context: lab
";

    fn args(dir: &tempfile::TempDir, context: Option<&str>) -> ClusterArgs {
        let path = dir.path().join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(TEST_CA);
        std::fs::write(
            &path,
            KUBECONFIG.replace("certificate-authority-data: CA", &format!("certificate-authority-data: {ca}")),
        )
        .unwrap();
        ClusterArgs {
            kubeconfig: Some(path),
            context: context.map(str::to_owned),
            request_timeout: Duration::from_secs(3),
            mesh_namespace: "harness-mesh".to_owned(),
        }
    }

    #[test]
    fn pem_wraps_der_at_64_columns() {
        assert_eq!(pem(&[vec![1, 2, 3]]), "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n");
        let long = pem(&[vec![0; 60]]);
        let lines: Vec<&str> = long.lines().collect();
        assert_eq!((lines.len(), lines[1].len(), lines[2].len()), (4, 64, 16), "{long}");
    }

    #[tokio::test]
    async fn the_kubeconfig_gives_server_ca_and_target() {
        let dir = tempfile::tempdir().unwrap();
        let lab = connect(&args(&dir, None)).await.unwrap();
        assert_eq!((lab.url.as_str(), lab.server.as_str()), ("https://127.0.0.1:6443/", "https://127.0.0.1:6443"));
        assert_eq!(lab.target(), "https://127.0.0.1:6443/ (context lab)");
        assert_eq!(lab.server_target(), "https://127.0.0.1:6443 (context lab)");
        assert_eq!(lab.ca_pem.as_deref(), Some(TEST_CA), "the CA comes back as the PEM it was");
        assert!(!lab.insecure);
        let open = connect(&args(&dir, Some("open"))).await.unwrap();
        assert_eq!((open.server_target().as_str(), open.insecure), ("https://10.0.0.1:6443 (context open)", true));
    }

    #[tokio::test]
    async fn a_missing_context_or_file_says_what_there_is() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&args(&dir, Some("prod"))).await.err().unwrap().to_string();
        assert_eq!(
            err,
            "the kubeconfig has no context \"prod\"; it has: lab, open (`kubectl config get-contexts` lists them)"
        );
        let missing = ClusterArgs { kubeconfig: Some("/nonexistent/kubeconfig".into()), ..args(&dir, None) };
        let err = connect(&missing).await.err().unwrap().to_string();
        assert_eq!(err, "cannot read the kubeconfig /nonexistent/kubeconfig: No such file or directory (os error 2)");
    }
}
