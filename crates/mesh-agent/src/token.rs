//! Renewal of an enrolled machine's API credential.
//!
//! `meshctl enroll` gives a machine a short-lived token (days) of its own ServiceAccount
//! `mesh-machine-<node>`, with its audience set, in a file the agent's kubeconfig names
//! (`tokenFile`). The agent renews it: once a set fraction of the token's life has passed
//! (`--token-renew-at`, half by default) it asks the API server for a new token of the same
//! ServiceAccount, audience and lifetime (TokenRequest; enroll grants the machine exactly that on
//! its own ServiceAccount and nothing else), and replaces the file atomically, mode 0600. The
//! API client re-reads the file within a minute, so a running agent never holds an expired
//! credential, and a stolen copy stops working within days.
//!
//! The agent reads only the token's claims it needs (`sub`, `aud`, `iat`, `exp`), without
//! checking its signature: it is the agent's own credential, and the API server judges it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The claims of a ServiceAccount token that renewal needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub account: String,
    /// The audiences the token is valid for.
    pub audiences: Vec<String>,
    /// Issued at, Unix seconds.
    pub issued_at: i64,
    /// Expires at, Unix seconds.
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    #[serde(default)]
    aud: Audience,
    iat: i64,
    exp: i64,
}

/// `aud` is a string or a list of strings (RFC 7519).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Claims {
    /// Reads the claims of a JWT (header.payload.signature, base64url).
    pub fn parse(token: &str) -> anyhow::Result<Self> {
        let payload = token.trim().split('.').nth(1).ok_or_else(|| anyhow!("the token is not a JWT (no payload)"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .context("the token's payload is not base64url")?;
        let raw: RawClaims = serde_json::from_slice(&bytes).context("the token's payload is not JSON claims")?;
        let rest = raw
            .sub
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| anyhow!("the token is not a ServiceAccount's (sub {:?})", raw.sub))?;
        let (namespace, account) =
            rest.split_once(':').ok_or_else(|| anyhow!("the token's sub {:?} names no ServiceAccount", raw.sub))?;
        if raw.exp <= raw.iat {
            bail!("the token expires (exp {}) before it was issued (iat {})", raw.exp, raw.iat);
        }
        let audiences = match raw.aud {
            Audience::None => Vec::new(),
            Audience::One(one) => vec![one],
            Audience::Many(many) => many,
        };
        Ok(Self {
            namespace: namespace.to_owned(),
            account: account.to_owned(),
            audiences,
            issued_at: raw.iat,
            expires_at: raw.exp,
        })
    }

    /// The lifetime the token was issued with, in seconds.
    pub fn lifetime(&self) -> i64 {
        self.expires_at - self.issued_at
    }

    /// When, in Unix seconds, the token is due for renewal: after `fraction` of its life.
    pub fn renew_at(&self, fraction: f64) -> i64 {
        // Lifetimes are at most years: the product is far inside f64's exact integers.
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        let elapsed = (self.lifetime() as f64 * fraction) as i64;
        self.issued_at + elapsed
    }
}

/// How renewal runs.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The token file the kubeconfig names.
    pub path: PathBuf,
    /// The fraction of a token's life after which it is renewed, in (0, 1).
    pub renew_at: f64,
}

/// Wait after a failed renewal before the next try.
const RETRY: Duration = Duration::from_secs(30);

impl Renewal {
    /// Renews the token whenever it is due, until `stop`. Failures are logged and retried
    /// every 30 s: the current token stays in place (and valid) meanwhile.
    pub async fn run(self, client: Client, stop: CancellationToken) {
        loop {
            let wait = match self.renew_if_due(&client, jiff_now()).await {
                Ok(wait) => wait,
                Err(err) => {
                    tracing::error!(
                        path = %self.path.display(),
                        "renewing the agent's API token: {err:#}; retrying in {} s (the current token stays in use \
                         until it expires; `meshctl enroll` again issues a new one)",
                        RETRY.as_secs()
                    );
                    RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Renews the token if it is due at `now` (Unix seconds); returns how long to wait until
    /// the next check.
    async fn renew_if_due(&self, client: &Client, now: i64) -> anyhow::Result<Duration> {
        let current = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading the token file {}", self.path.display()))?;
        let claims = Claims::parse(&current)?;
        let due = claims.renew_at(self.renew_at);
        if now < due {
            return Ok(Duration::from_secs(u64::try_from(due - now).unwrap_or(0).clamp(1, 600)));
        }
        let token = request(client, &claims).await?;
        let renewed = Claims::parse(&token).context("the API server issued a token that cannot be read")?;
        write_private(&self.path, &token)?;
        tracing::info!(
            account = %format!("{}/{}", claims.namespace, claims.account),
            audiences = ?renewed.audiences,
            expires_at = renewed.expires_at,
            "renewed the agent's API token"
        );
        Ok(Duration::from_secs(1))
    }
}

/// A new token of the same ServiceAccount, audiences and lifetime.
async fn request(client: &Client, claims: &Claims) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &claims.namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: claims.audiences.clone(),
            bound_object_ref: None,
            expiration_seconds: Some(claims.lifetime()),
        },
        ..TokenRequest::default()
    };
    let issued: TokenRequest = api
        .create_subresource("token", &claims.account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!(
                "requesting a token of ServiceAccount {}/{} (enroll grants the machine create on its own \
                 serviceaccounts/token; run `meshctl enroll` again if that was removed)",
                claims.namespace, claims.account
            )
        })?;
    Ok(issued.status.ok_or_else(|| anyhow!("the API server answered the TokenRequest without a token"))?.token)
}

/// Replaces `path` with `content`, mode 0600, atomically (a temporary file, then a rename).
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))
}

fn jiff_now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(claims.to_string().as_bytes()), b64(b"signature"))
    }

    #[test]
    fn reads_a_service_account_token() {
        let token = jwt(&serde_json::json!({
            "sub": "system:serviceaccount:harness-mesh:mesh-machine-edge-1",
            "aud": ["https://kubernetes.default.svc.cluster.local"],
            "iat": 1000, "exp": 1000 + 7 * 86400,
        }));
        let claims = Claims::parse(&token).unwrap();
        assert_eq!(claims.namespace, "harness-mesh");
        assert_eq!(claims.account, "mesh-machine-edge-1");
        assert_eq!(claims.audiences, ["https://kubernetes.default.svc.cluster.local"]);
        assert_eq!(claims.lifetime(), 7 * 86400);
        assert_eq!(claims.renew_at(0.5), 1000 + 7 * 86400 / 2);
    }

    #[test]
    fn a_single_string_audience_is_read_too() {
        let token = jwt(&serde_json::json!({"sub": "system:serviceaccount:ns:sa", "aud": "api", "iat": 1, "exp": 601}));
        assert_eq!(Claims::parse(&token).unwrap().audiences, ["api"]);
    }

    #[test]
    fn refuses_what_is_not_a_service_account_token() {
        for (claims, expected) in [
            (serde_json::json!({"sub": "alice", "iat": 1, "exp": 2}), "not a ServiceAccount's"),
            (serde_json::json!({"sub": "system:serviceaccount:ns", "iat": 1, "exp": 2}), "names no ServiceAccount"),
            (serde_json::json!({"sub": "system:serviceaccount:ns:sa", "iat": 5, "exp": 5}), "before it was issued"),
        ] {
            let err = Claims::parse(&jwt(&claims)).unwrap_err().to_string();
            assert!(err.contains(expected), "{claims}: {err}");
        }
        assert!(Claims::parse("not-a-jwt").unwrap_err().to_string().contains("not a JWT"));
    }

    #[test]
    fn the_file_is_replaced_whole_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("mesh-agent-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "old").unwrap();
        write_private(&path, "new-token").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new-token");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!path.with_extension("new").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
