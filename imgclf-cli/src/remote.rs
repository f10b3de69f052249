//! The HTTP side: uploads with retries that honour `Retry-After`, and long-polled results.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::Value;

use crate::run::{Fatal, Verdict};

/// Longest wait a server may ask for before a retry; beyond it the run would look hung.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Longest long poll the server grants.
const LONG_POLL_SECONDS: u64 = 30;

/// A client of one imgclf server.
pub struct Remote {
    http: reqwest::Client,
    base: Url,
    attempts: u32,
}

/// Why a request gave no answer to use.
enum Failed {
    /// The server refused it for good (a 4xx other than 401, 403, 408, 429) or kept asking for
    /// a retry past the attempts: a problem of this image.
    Refused { status: StatusCode, why: String },
    /// No point going on with the run.
    Fatal(Fatal),
}

impl Remote {
    /// A client for the server at `server` (`http(s)://host[:port][/prefix]`).
    pub fn new(server: &str, api_key: Option<&str>, attempts: u32) -> anyhow::Result<Self> {
        let mut base =
            Url::parse(server).with_context(|| format!("--server {server:?} is not a URL"))?;
        anyhow::ensure!(
            matches!(base.scheme(), "http" | "https"),
            "--server {server:?} must be an http:// or https:// URL"
        );
        // A base with a path prefix keeps it when the API paths are joined on.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key.filter(|k| !k.is_empty()) {
            let mut value = format!("Bearer {key}")
                .parse::<reqwest::header::HeaderValue>()
                .context("the API key is not valid in an HTTP header")?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("imgclf-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base,
            attempts,
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Fails before any file, with the reason, when the server cannot be reached (after the
    /// configured attempts: it may be starting), rather than after every file's retries.
    pub async fn check(&self) -> anyhow::Result<()> {
        let url = self.url(&["health"]);
        let mut attempt = 1;
        loop {
            let sent = self
                .http
                .get(url.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(error) if attempt < self.attempts => {
                    let delay = Duration::from_secs(1 << (attempt - 1).min(5));
                    tracing::info!(error = %error_chain(&error), ?delay, "the server is not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "cannot reach the server at {} ({attempt} attempts)",
                            self.base
                        )
                    })
                }
            }
        }
    }

    /// Uploads one image; returns its task id, or why the server would not take it.
    pub async fn upload(
        &self,
        name: &str,
        bytes: Bytes,
        key: &str,
    ) -> Result<Result<String, String>, Fatal> {
        let url = self.url(&["api", "upload-image"]);
        let length = bytes.len() as u64;
        let response = self
            .send(None, || {
                // A known length, so the server charges this upload its size, not the cap.
                let part = reqwest::multipart::Part::stream_with_length(bytes.clone(), length)
                    .file_name(name.to_string());
                self.http
                    .post(url.clone())
                    .header("Idempotency-Key", key)
                    .multipart(reqwest::multipart::Form::new().part("file", part))
                    .timeout(Duration::from_secs(300))
            })
            .await;
        let body = match response {
            Ok(body) => body,
            // No upload route here: every file would fail alike (a wrong --server prefix).
            Err(Failed::Refused {
                status: StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED,
                why,
            }) => {
                return Err(Fatal(format!(
                    "{url} is not an imgclf upload route (is --server right?): {why}"
                )))
            }
            Err(Failed::Refused { why, .. }) => {
                return Ok(Err(format!("refused by the server: {why}")))
            }
            Err(Failed::Fatal(fatal)) => return Err(fatal),
        };
        Ok(match body["task_id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => Err(format!(
                "the server accepted the upload but sent no task id: {body}"
            )),
        })
    }

    /// Waits for the task to end (long polls, so the answer comes as soon as it does) or for
    /// `timeout`.
    pub async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Verdict, Fatal> {
        let url = self.url(&["api", "task-status", task_id]);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.as_secs().min(LONG_POLL_SECONDS);
            let asked = Instant::now();
            // Busy answers do not end a wait before its deadline: the result is there to have.
            let document = self
                .send(Some(deadline), || {
                    self.http
                        .get(url.clone())
                        .query(&[("wait", wait)])
                        .timeout(Duration::from_secs(wait + 30))
                })
                .await;
            let document = match document {
                Ok(document) => document,
                Err(Failed::Refused { why, .. }) => {
                    let why = format!("asking for the result failed: {why}");
                    return Ok(Verdict::error(Some(task_id.to_string()), why));
                }
                Err(Failed::Fatal(fatal)) => return Err(fatal),
            };
            let verdict = Verdict::from_status(task_id, &document);
            if verdict.is_final() {
                return Ok(verdict);
            }
            if Instant::now() >= deadline {
                return Ok(verdict.timed_out(timeout));
            }
            // A server that does not hold the request (an older one) is not polled flat out.
            if asked.elapsed() < Duration::from_millis(200) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// The task's status document, `None` for an unknown task.
    pub async fn status(&self, task_id: &str, wait: Option<f64>) -> anyhow::Result<Option<Value>> {
        let url = self.url(&["api", "task-status", task_id]);
        let response = self
            .send(None, || {
                let request = self.http.get(url.clone());
                match wait {
                    Some(seconds) => request
                        .query(&[("wait", seconds)])
                        .timeout(Duration::from_secs_f64(seconds.max(0.0) + 30.0)),
                    None => request.timeout(Duration::from_secs(30)),
                }
            })
            .await;
        match response {
            Ok(document) => Ok(Some(document)),
            Err(Failed::Refused { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(Failed::Refused { why, .. }) => anyhow::bail!("the server refused: {why}"),
            Err(Failed::Fatal(fatal)) => Err(fatal.into()),
        }
    }

    /// Sends the request `build` makes, again while the server says to retry (429, 503, and
    /// 408, 500, 502, 504), after its `Retry-After` or else a growing delay, and while it
    /// cannot be reached, up to the configured attempts; busy answers also as long as the
    /// retry can start before `busy_until`. A 408 is retried once only: twice in a row means
    /// the link is too slow for the server's request timeout, and every further try would
    /// send the whole file again for nothing. Every request sent here is safe to repeat:
    /// uploads carry their idempotency key. Returns the JSON body of a 2xx.
    async fn send(
        &self,
        busy_until: Option<Instant>,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Value, Failed> {
        let (mut attempt, mut unanswered): (u32, u32) = (0, 0);
        // Whether the last answer was a 408.
        let mut timed_out = false;
        loop {
            attempt += 1;
            let backoff = Duration::from_secs(1 << (attempt - 1).min(5));
            let last = attempt >= self.attempts;
            let response = match build().send().await {
                Ok(response) => response,
                Err(error) => {
                    unanswered += 1;
                    if unanswered >= self.attempts {
                        let why = format!(
                            "the server did not answer after {unanswered} attempts: {}",
                            error_chain(&error)
                        );
                        return Err(Failed::Fatal(Fatal(why)));
                    }
                    let delay = Duration::from_secs(1 << (unanswered - 1).min(5));
                    tracing::info!(error = %error_chain(&error), ?delay, "request failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let status = response.status();
            if status.is_success() {
                return response.json::<Value>().await.map_err(|e| Failed::Refused {
                    status,
                    why: format!("the server's answer is not JSON: {e}"),
                });
            }
            let retry_after = retry_after(response.headers());
            let detail = detail(response).await;
            match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let why = format!("the server refused the API key ({status}): {detail}");
                    return Err(Failed::Fatal(Fatal(why)));
                }
                StatusCode::REQUEST_TIMEOUT if timed_out => {
                    let why = format!(
                        "the server timed out twice in a row waiting for the request \
                         ({status}: {detail}); the link is likely too slow for its request \
                         timeout (IMGCLF_REQUEST_TIMEOUT on the server)"
                    );
                    return Err(Failed::Refused { status, why });
                }
                StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::BAD_GATEWAY
                | StatusCode::GATEWAY_TIMEOUT => {
                    timed_out = status == StatusCode::REQUEST_TIMEOUT;
                    let delay = retry_after.unwrap_or(backoff).min(MAX_RETRY_AFTER);
                    let in_time = busy_until.is_some_and(|until| Instant::now() + delay < until);
                    if last && !in_time {
                        let why = format!("gave up after {attempt} attempts: {status}: {detail}");
                        return Err(Failed::Refused { status, why });
                    }
                    tracing::info!(%status, ?delay, "the server asks to retry");
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    let code = status.as_u16();
                    let reason = status.canonical_reason().unwrap_or("");
                    let why = format!("{code} {reason}: {detail}");
                    return Err(Failed::Refused { status, why });
                }
            }
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not sent by imgclf and falls back to the
/// client's own backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The `detail` of an imgclf error body, else the body's start.
async fn detail(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(body)) if body.get("detail").is_some_and(Value::is_string) => {
            body["detail"].as_str().unwrap_or_default().to_string()
        }
        _ => text.chars().take(200).collect(),
    }
}

/// An error with its causes: reqwest's own message alone rarely says what happened.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    imgclf::error_line(std::iter::successors(Some(error), |e| e.source()))
}
