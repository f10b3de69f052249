use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::guarded::{system_lookup, GuardedClient, Lookup};
use super::policy::CallbackPolicy;
use super::{validate_callback_url, Notifier, NotifyError};

/// The id of one notification, the same on every retry (receivers deduplicate on it).
pub const DELIVERY_HEADER: &str = "x-imgclf-delivery";
/// Unix seconds when this attempt was sent.
pub const TIMESTAMP_HEADER: &str = "x-imgclf-timestamp";
/// `v2=` and the hex HMAC-SHA256 of `<delivery id>.<timestamp>.<body>` (see the README).
pub const SIGNATURE_HEADER: &str = "x-imgclf-signature";

/// What a client reads when callbacks would go out unsigned without the operator's consent.
const SECRET_REQUIRED: &str = "a signing secret is required: this service sends callbacks once \
                               IMGCLF_WEBHOOK_SECRET is set (or IMGCLF_WEBHOOK_UNSIGNED=true)";

/// How the webhook client behaves.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Per attempt.
    pub timeout: Duration,
    /// Signs every request (HMAC-SHA256) when set.
    pub secret: Option<String>,
    /// Sends callbacks unsigned when `secret` is unset; without it they are refused.
    pub unsigned: bool,
    /// Which addresses callbacks may reach.
    pub policy: CallbackPolicy,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("timeout", &self.timeout)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("unsigned", &self.unsigned)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(super::DEFAULT_TIMEOUT_SECS),
            secret: None,
            unsigned: false,
            policy: CallbackPolicy::default(),
        }
    }
}

/// POSTs the payload as JSON, signed, one attempt at a time (the worker's dispatcher keeps the
/// schedule of retries in the result store), through the SSRF-safe client every outside
/// request takes: only http(s), every address checked against the [`CallbackPolicy`] at upload
/// and again when connecting, no proxies, no redirects.
pub struct WebhookNotifier {
    client: GuardedClient,
    config: WebhookConfig,
}

impl WebhookNotifier {
    /// A client with `config`'s timeouts, policy and signing secret.
    pub fn new(config: WebhookConfig) -> Result<Self, NotifyError> {
        Self::with_lookup(config, system_lookup())
    }

    /// The same, resolving names with `lookup`: tests answer as a rebinding DNS server would.
    fn with_lookup(config: WebhookConfig, lookup: Lookup) -> Result<Self, NotifyError> {
        let client =
            GuardedClient::new(config.policy.clone(), config.timeout, lookup).map_err(|e| {
                NotifyError::Attempt {
                    status: None,
                    retryable: false,
                    source: e.into(),
                }
            })?;
        Ok(Self { client, config })
    }

    fn refused(&self, why: impl Into<String>) -> NotifyError {
        NotifyError::Refused(why.into())
    }

    /// Callbacks without a secret go out only where the operator said they may.
    fn check_signing(&self) -> Result<(), NotifyError> {
        if self.config.secret.is_none() && !self.config.unsigned {
            return Err(self.refused(SECRET_REQUIRED));
        }
        Ok(())
    }

    /// `v2=<hex HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">`.
    fn signature(&self, delivery: &str, timestamp: u64, body: &[u8]) -> Option<String> {
        let secret = self.config.secret.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(delivery.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        Some(format!("v2={}", hex::encode(mac.finalize().into_bytes())))
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn check_url(&self, url: &str) -> Result<(), NotifyError> {
        validate_callback_url(url)?;
        self.check_signing()?;
        self.client.check(url).await
    }

    async fn deliver(
        &self,
        url: &str,
        payload: &serde_json::Value,
        delivery: &str,
    ) -> Result<(), NotifyError> {
        validate_callback_url(url)?;
        self.check_signing()?;
        let (url, client) = self.client.request_target(url)?;
        let body = serde_json::to_vec(payload).map_err(|e| NotifyError::Attempt {
            status: None,
            retryable: false,
            source: e.into(),
        })?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(DELIVERY_HEADER, delivery)
            .header(TIMESTAMP_HEADER, timestamp.to_string());
        if let Some(signature) = self.signature(delivery, timestamp, &body) {
            request = request.header(SIGNATURE_HEADER, signature);
        }
        match request.body(body).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => {
                let status = response.status();
                // A redirect is not followed, and it and another 4xx will not change on a
                // retry; 408 and 429 may.
                let retryable = !(status.is_redirection()
                    || (status.is_client_error() && status != 408 && status != 429));
                Err(NotifyError::Attempt {
                    status: Some(status.as_u16()),
                    retryable,
                    source: format!("HTTP {status}").into(),
                })
            }
            // A refused address is final; a network error may pass.
            Err(error) => Err(GuardedClient::failed(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use std::net::IpAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::guarded::REFUSED_ADDRESS;
    use super::*;

    /// A loopback HTTP receiver that answers 204 to everything and counts its connections.
    async fn receiver() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // Read the headers and the body they announce, then answer.
                    let mut seen = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buffer[..n]);
                        let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let answer = "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (port, connections)
    }

    /// A DNS server that answers `first` once, then `then` to every later question.
    fn rebinding(first: &str, then: &str) -> (Lookup, Arc<AtomicUsize>) {
        let (first, then): (IpAddr, IpAddr) = (first.parse().unwrap(), then.parse().unwrap());
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let lookup: Lookup = Arc::new(move |_host: String| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(vec![if n == 0 { first } else { then }]) })
        });
        (lookup, asked)
    }

    fn config(allow: &[&str]) -> WebhookConfig {
        WebhookConfig {
            timeout: Duration::from_secs(5),
            secret: Some("unit-test-secret".into()),
            policy: CallbackPolicy::new(allow.iter().map(|n| n.parse().unwrap()).collect()),
            ..WebhookConfig::default()
        }
    }

    fn payload() -> serde_json::Value {
        serde_json::json!({"task_id": "t", "state": "SUCCESS"})
    }

    #[tokio::test]
    async fn a_name_rebound_after_the_upload_check_is_refused_at_delivery() {
        let (port, connections) = receiver().await;
        // The upload check sees an allowlisted address; delivery is answered with the
        // receiver's, which the policy refuses.
        let (lookup, asked) = rebinding("127.0.0.2", "127.0.0.1");
        let notifier = WebhookNotifier::with_lookup(config(&["127.0.0.2/32"]), lookup).unwrap();
        let url = format!("http://rebind.example:{port}/hook");
        notifier
            .check_url(&url)
            .await
            .expect("the first answer passes");
        let error = notifier.deliver(&url, &payload(), "d-1").await.unwrap_err();
        assert!(
            matches!(&error, NotifyError::Refused(why) if why == REFUSED_ADDRESS),
            "{error}"
        );
        assert!(
            asked.load(Ordering::SeqCst) >= 2,
            "the client asked the lookup"
        );
        assert_eq!(
            connections.load(Ordering::SeqCst),
            0,
            "nothing reached the refused address"
        );
        assert!(
            !error.to_string().contains("127.0.0"),
            "no address is echoed: {error}"
        );
    }

    #[tokio::test]
    async fn the_resolver_delivers_to_an_allowlisted_address() {
        let (port, connections) = receiver().await;
        let (lookup, _) = rebinding("127.0.0.1", "127.0.0.1");
        let notifier = WebhookNotifier::with_lookup(config(&["127.0.0.1"]), lookup).unwrap();
        let url = format!("http://hook.example:{port}/hook");
        notifier.check_url(&url).await.unwrap();
        notifier.deliver(&url, &payload(), "d-1").await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_public_name_on_another_port_is_refused_by_the_resolver() {
        // A public answer each time: fine on port 80 or 443, refused on any other port, at
        // upload and at delivery, without a connection attempt.
        let (lookup, _) = rebinding("93.184.216.34", "93.184.216.34");
        let notifier = WebhookNotifier::with_lookup(config(&[]), lookup).unwrap();
        notifier
            .check_url("http://public.example/hook")
            .await
            .unwrap();
        notifier
            .check_url("https://public.example/hook")
            .await
            .unwrap();
        let url = "http://public.example:8080/hook";
        let refused = notifier.check_url(url).await.unwrap_err();
        assert!(matches!(refused, NotifyError::Refused(_)), "{refused}");
        let error = notifier.deliver(url, &payload(), "d-1").await.unwrap_err();
        assert!(
            matches!(&error, NotifyError::Refused(why) if why == REFUSED_ADDRESS),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_refused_like_an_internal_one() {
        let lookup: Lookup = Arc::new(|_host: String| {
            Box::pin(async {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such host",
                ))
            })
        });
        let notifier = WebhookNotifier::with_lookup(config(&[]), lookup).unwrap();
        let missing = notifier.check_url("http://missing.example/").await;
        let (internal, _) = rebinding("10.0.0.1", "10.0.0.1");
        let notifier = WebhookNotifier::with_lookup(config(&[]), internal).unwrap();
        let internal = notifier.check_url("http://internal.example/").await;
        assert_eq!(
            missing.unwrap_err().to_string(),
            internal.unwrap_err().to_string(),
            "a refusal does not tell which names exist inside"
        );
    }

    #[test]
    fn the_signature_covers_the_delivery_id_the_timestamp_and_the_body() {
        let notifier = WebhookNotifier::new(config(&[])).unwrap();
        let signed = notifier.signature("d-1", 1700000000, b"{}").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"unit-test-secret").unwrap();
        mac.update(b"d-1.1700000000.{}");
        assert_eq!(
            signed,
            format!("v2={}", hex::encode(mac.finalize().into_bytes()))
        );
        assert_ne!(
            signed,
            notifier.signature("d-2", 1700000000, b"{}").unwrap()
        );
        assert_ne!(
            signed,
            notifier.signature("d-1", 1700000001, b"{}").unwrap()
        );
        assert_ne!(
            signed,
            notifier.signature("d-1", 1700000000, b"[]").unwrap()
        );
    }
}
