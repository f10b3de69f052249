use std::time::Duration;

use async_trait::async_trait;

use super::{validate_callback_url, Notifier, NotifyError};

/// POSTs the payload as JSON, retrying with exponential backoff. Redirects are not followed, so
/// a callback cannot bounce the request somewhere else.
pub struct WebhookNotifier {
    client: reqwest::Client,
    attempts: u32,
    backoff: Duration,
}

impl WebhookNotifier {
    pub fn new(timeout: Duration, attempts: u32, backoff: Duration) -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("imgclf/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Failed {
                attempts: 0,
                message: e.to_string(),
            })?;
        Ok(Self {
            client,
            attempts: attempts.max(1),
            backoff,
        })
    }
}

impl Default for WebhookNotifier {
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 5, Duration::from_millis(500))
            .expect("the default HTTP client builds")
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn notify(&self, url: &str, payload: &serde_json::Value) -> Result<(), NotifyError> {
        validate_callback_url(url)?;
        let mut message = String::new();
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                tokio::time::sleep(self.backoff * 2u32.pow(attempt - 2)).await;
            }
            match self.client.post(url).json(payload).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                // A 4xx other than 408/429 will not change on a retry.
                Ok(response) => {
                    let status = response.status();
                    message = format!("HTTP {status}");
                    if status.is_client_error() && status != 408 && status != 429 {
                        return Err(NotifyError::Failed {
                            attempts: attempt,
                            message,
                        });
                    }
                }
                Err(error) => message = error.without_url().to_string(),
            }
        }
        Err(NotifyError::Failed {
            attempts: self.attempts,
            message,
        })
    }
}
