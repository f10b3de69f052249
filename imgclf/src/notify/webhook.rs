use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use sha2::Sha256;

use super::policy::CallbackPolicy;
use super::{validate_callback_url, Notifier, NotifyError};

/// The id of one notification, the same on every retry (receivers deduplicate on it).
pub const DELIVERY_HEADER: &str = "x-imgclf-delivery";
/// Unix seconds when this attempt was sent.
pub const TIMESTAMP_HEADER: &str = "x-imgclf-timestamp";
/// `v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>` (see the README).
pub const SIGNATURE_HEADER: &str = "x-imgclf-signature";

/// How the webhook client behaves.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Per attempt.
    pub timeout: Duration,
    /// Requests per callback at most.
    pub attempts: u32,
    /// First retry delay; doubles each time, with jitter.
    pub backoff: Duration,
    /// No attempt starts later than this after the first.
    pub max_age: Duration,
    /// Signs every request (HMAC-SHA256) when set.
    pub secret: Option<String>,
    /// Which addresses callbacks may reach.
    pub policy: CallbackPolicy,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .field("max_age", &self.max_age)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(super::DEFAULT_TIMEOUT_SECS),
            attempts: super::DEFAULT_ATTEMPTS,
            backoff: Duration::from_millis(500),
            max_age: Duration::from_secs(3600),
            secret: None,
            policy: CallbackPolicy::default(),
        }
    }
}

/// POSTs the payload as JSON, signed, at least once, retrying with exponential backoff and
/// jitter. Safe against SSRF: only http(s), the resolved addresses must pass the
/// [`CallbackPolicy`] (checked at upload, and again by the resolver the client connects
/// through, so DNS rebinding gains nothing), and redirects are not followed.
pub struct WebhookNotifier {
    client: reqwest::Client,
    config: WebhookConfig,
}

/// Resolves names for the webhook client, dropping every address the policy refuses.
struct PolicyResolver(Arc<CallbackPolicy>);

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let refused = std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to refused addresses"),
                );
                return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

impl WebhookNotifier {
    /// A client with `config`'s timeouts, policy and signing secret.
    pub fn new(config: WebhookConfig) -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(PolicyResolver(Arc::new(config.policy.clone()))))
            .user_agent(concat!("imgclf/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Failed {
                attempts: 0,
                status: None,
                source: e.into(),
            })?;
        Ok(Self { client, config })
    }

    fn refused(&self, why: impl Into<String>) -> NotifyError {
        NotifyError::Refused(why.into())
    }

    /// `v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
    fn signature(&self, timestamp: u64, body: &[u8]) -> Option<String> {
        let secret = self.config.secret.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        Some(format!("v1={}", hex::encode(mac.finalize().into_bytes())))
    }

    /// Exponential backoff with ±50% jitter, so retries from many tasks do not synchronise.
    fn delay(&self, retry: u32) -> Duration {
        let base = self
            .config
            .backoff
            .saturating_mul(2u32.saturating_pow(retry.min(16)));
        let jitter = f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
        base.mul_f64(0.5 + jitter)
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn check_url(&self, url: &str) -> Result<(), NotifyError> {
        validate_callback_url(url)?;
        let parsed = Url::parse(url).map_err(|e| self.refused(format!("not a valid URL: {e}")))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let host = parsed
            .host_str()
            .ok_or_else(|| self.refused("the URL has no host"))?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        let addresses: Vec<IpAddr> = match literal {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| self.refused(format!("the host {host:?} does not resolve")))?
                .map(|a| a.ip())
                .collect(),
        };
        if addresses.is_empty() {
            return Err(self.refused("the host has no address"));
        }
        if let Some(ip) = addresses.iter().find(|ip| !self.config.policy.allows(**ip)) {
            return Err(self.refused(format!(
                "it points to {ip}, an internal address (loopback, private, link-local, \
                 multicast or reserved); allow it with IMGCLF_WEBHOOK_ALLOW"
            )));
        }
        Ok(())
    }

    async fn notify(&self, url: &str, payload: &serde_json::Value) -> Result<u32, NotifyError> {
        validate_callback_url(url)?;
        let body = serde_json::to_vec(payload).map_err(|e| NotifyError::Failed {
            attempts: 0,
            status: None,
            source: e.into(),
        })?;
        // One id for every attempt of this notification: receivers deduplicate on it.
        let delivery = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut last: (Option<u16>, crate::BoxError) = (None, "no attempt was made".into());
        let mut attempt = 0;
        while attempt < self.config.attempts.max(1) {
            if attempt > 0 {
                let wait = self.delay(attempt - 1);
                if started.elapsed() + wait > self.config.max_age {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
            attempt += 1;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut request = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(DELIVERY_HEADER, &delivery)
                .header(TIMESTAMP_HEADER, timestamp.to_string());
            if let Some(signature) = self.signature(timestamp, &body) {
                request = request.header(SIGNATURE_HEADER, signature);
            }
            match request.body(body.clone()).send().await {
                Ok(response) if response.status().is_success() => return Ok(attempt),
                Ok(response) => {
                    let status = response.status();
                    last = (Some(status.as_u16()), format!("HTTP {status}").into());
                    // Another 4xx will not change on a retry; 408 and 429 may.
                    if status.is_client_error() && status != 408 && status != 429 {
                        break;
                    }
                }
                Err(error) => last = (None, error.without_url().into()),
            }
        }
        Err(NotifyError::Failed {
            attempts: attempt,
            status: last.0,
            source: last.1,
        })
    }
}
