//! The `Notifier` port: tells a client's callback that its task finished. Its failure never
//! changes the task's outcome.

#[cfg(feature = "webhook")]
mod guarded;
mod policy;
#[cfg(feature = "webhook")]
mod webhook;

#[cfg(feature = "webhook")]
pub use guarded::{FetchError, UrlFetcher};
pub use policy::{is_internal, CallbackPolicy, IpNet, PUBLIC_PORTS};
#[cfg(feature = "webhook")]
pub use webhook::{
    WebhookConfig, WebhookNotifier, DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::ConfigError;

/// Seconds one callback attempt may take, by default.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// Attempts per callback, by default.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// How callbacks are sent.
#[derive(Clone, Default)]
pub struct NotifierOptions {
    /// Attempts per callback; 0 turns callbacks off.
    pub attempts: u32,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Signs every callback (HMAC-SHA256).
    pub secret: Option<String>,
    /// Internal networks callbacks may reach anyway.
    pub allow: Vec<IpNet>,
    /// Sends callbacks unsigned when `secret` is unset; they are refused otherwise.
    pub unsigned: bool,
}

impl std::fmt::Debug for NotifierOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierOptions")
            .field("attempts", &self.attempts)
            .field("timeout", &self.timeout)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("allow", &self.allow)
            .field("unsigned", &self.unsigned)
            .finish()
    }
}

/// Webhooks, unless `attempts` is 0 or the `webhook` feature is off.
pub fn build(options: &NotifierOptions) -> Result<Arc<dyn Notifier>, ConfigError> {
    #[cfg(feature = "webhook")]
    if options.attempts > 0 {
        if options.secret.is_none() {
            if options.unsigned {
                tracing::warn!("IMGCLF_WEBHOOK_SECRET is unset: callbacks go out unsigned");
            } else {
                tracing::warn!(
                    "IMGCLF_WEBHOOK_SECRET is unset: callbacks are refused at upload \
                     unless IMGCLF_WEBHOOK_UNSIGNED=true"
                );
            }
        }
        return Ok(Arc::new(WebhookNotifier::new(WebhookConfig {
            timeout: options.timeout.max(Duration::from_secs(1)),
            secret: options.secret.clone(),
            unsigned: options.unsigned,
            policy: CallbackPolicy::new(options.allow.clone()),
        })?));
    }
    #[cfg(not(feature = "webhook"))]
    if options.attempts > 0 {
        tracing::warn!("callbacks are off: this build lacks the `webhook` feature");
    }
    Ok(Arc::new(NoopNotifier))
}

/// Why a callback was not delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// The URL may not be a callback; the reason is safe to show the client.
    #[error("callback URL refused: {0}")]
    Refused(String),
    /// One attempt failed; `retryable` says whether another may succeed (network errors, 5xx,
    /// 408 and 429 may; a redirect or another 4xx will not).
    #[error("callback attempt failed: {source}")]
    Attempt {
        /// The HTTP status of the answer, if there was one.
        status: Option<u16>,
        /// Whether trying again may help.
        retryable: bool,
        /// What went wrong.
        source: crate::BoxError,
    },
}

/// Tells clients that their task finished.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Whether `url` may be a callback; asked at upload, so a refused URL is a 422 then rather
    /// than a failed delivery later.
    async fn check_url(&self, url: &str) -> Result<(), NotifyError> {
        validate_callback_url(url)
    }

    /// One attempt to deliver `payload` (JSON) to `url` as notification `delivery` (the same id
    /// on every attempt: receivers deduplicate on it). The worker's dispatcher calls it and
    /// keeps the schedule of retries in the result store, so they survive restarts.
    async fn deliver(
        &self,
        url: &str,
        payload: &serde_json::Value,
        delivery: &str,
    ) -> Result<(), NotifyError>;

    /// False for a notifier that sends nothing: no delivery state is recorded then.
    fn enabled(&self) -> bool {
        true
    }
}

/// Drops every notification: for deployments without callbacks.
pub struct NoopNotifier;

#[async_trait]
impl Notifier for NoopNotifier {
    async fn deliver(
        &self,
        _url: &str,
        _payload: &serde_json::Value,
        _delivery: &str,
    ) -> Result<(), NotifyError> {
        Ok(())
    }

    fn enabled(&self) -> bool {
        false
    }
}

/// Only absolute http(s) URLs with a host are callbacks; checked at upload.
pub fn validate_callback_url(url: &str) -> Result<(), NotifyError> {
    let refused = |why: &str| Err(NotifyError::Refused(why.to_string()));
    if url.len() > 2048 {
        return refused("longer than 2048 characters");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return refused("not an absolute URL");
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return refused("only http and https callbacks are allowed");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return refused("credentials in callback URLs are not allowed");
    }
    if authority.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return refused("not a valid URL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_callback_url as check;

    #[test]
    fn only_plain_http_urls_are_callbacks() {
        assert!(check("https://example.com/hook").is_ok());
        assert!(check("http://example.com:8080/hook?x=1").is_ok());
        assert!(check("ftp://example.com/").is_err());
        assert!(check("file:///etc/passwd").is_err());
        assert!(check("example.com/hook").is_err());
        assert!(check("http:///nohost").is_err());
        assert!(check("http://user:pw@example.com/").is_err());
        assert!(check("http://exa mple.com/").is_err());
    }
}
