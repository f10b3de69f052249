//! The HTTP client every outside request of the service goes through (callbacks, and images
//! fetched from a client's URL): safe against SSRF. Only http(s); every address it connects to
//! must pass the [`CallbackPolicy`], port included, checked when the URL is accepted and again
//! when connecting (by the resolver the client connects through, or here for an IP-literal
//! host, which reqwest never resolves), so DNS rebinding gains nothing; proxy variables are
//! ignored, since a proxy would resolve the name itself; and redirects are not followed.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use super::policy::{CallbackPolicy, PUBLIC_PORTS};
use super::{validate_callback_url, NotifyError};

/// What a client reads when a URL's address or port is refused: the same words whatever the
/// reason, so that a refusal reveals nothing of what a name resolves to.
pub(super) const REFUSED_ADDRESS: &str =
    "the host resolves to an address this service may not reach (or does not resolve); \
     public addresses take ports 80 and 443 only";

/// A name lookup: every address the name has (ports are the URL's business).
pub(super) type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system's resolver.
pub(super) fn system_lookup() -> Lookup {
    Arc::new(|host: String| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    })
}

/// The resolver's answer when the policy refuses every address a name has; `notify` finds it
/// in the error's chain and gives up at once.
#[derive(Debug)]
struct AddressRefused;

impl std::fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REFUSED_ADDRESS)
    }
}

impl std::error::Error for AddressRefused {}

/// Whether `error` (or anything it wraps) is the resolver's refusal.
fn refused_by_resolver(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<AddressRefused>() {
            return true;
        }
        // An io::Error's source() skips the error it wraps: look at that one too.
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if inner.is::<AddressRefused>() {
                return true;
            }
        }
        next = error.source();
    }
    false
}

/// Resolves names for a webhook client, dropping every address the policy refuses for the
/// ports that client connects on.
struct PolicyResolver {
    policy: Arc<CallbackPolicy>,
    /// The client connects on one of the [`PUBLIC_PORTS`]: public addresses pass too.
    public_ports: bool,
    lookup: Lookup,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, public_ports) = (self.policy.clone(), self.public_ports);
        let host = name.as_str().to_string();
        let lookup = (self.lookup)(host.clone());
        Box::pin(async move {
            let found = lookup.await?;
            let (allowed, refused): (Vec<IpAddr>, Vec<IpAddr>) =
                found.into_iter().partition(|ip| {
                    if public_ports {
                        policy.allows(*ip)
                    } else {
                        policy.allowlisted(*ip)
                    }
                });
            if !refused.is_empty() {
                tracing::debug!(%host, ?refused, public_ports, "callback addresses dropped");
            }
            if allowed.is_empty() {
                if refused.is_empty() {
                    let none = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                    return Err(Box::new(none) as Box<dyn std::error::Error + Send + Sync>);
                }
                return Err(Box::new(AddressRefused) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs = allowed.into_iter().map(|ip| SocketAddr::new(ip, 0));
            Ok(Box::new(addrs) as Addrs)
        })
    }
}

/// Where a callback URL points: the parsed URL, its port, and its host if that is an address.
struct Target {
    url: Url,
    port: u16,
    literal: Option<IpAddr>,
}

/// Two clients under one policy, and the lookup their resolvers ask.
pub(super) struct GuardedClient {
    /// Connects on ports 80 and 443, to public or allowlisted addresses.
    public_ports: reqwest::Client,
    /// Connects on any other port, to allowlisted addresses only.
    other_ports: reqwest::Client,
    lookup: Lookup,
    policy: CallbackPolicy,
}

impl GuardedClient {
    /// Clients whose every request takes at most `timeout`.
    pub(super) fn new(
        policy: CallbackPolicy,
        timeout: Duration,
        lookup: Lookup,
    ) -> Result<Self, reqwest::Error> {
        let shared = Arc::new(policy.clone());
        let client = |public_ports: bool| {
            let resolver = PolicyResolver {
                policy: shared.clone(),
                public_ports,
                lookup: lookup.clone(),
            };
            reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                // A proxy would resolve the name itself, past the policy's resolver.
                .no_proxy()
                .dns_resolver(Arc::new(resolver))
                .user_agent(concat!("imgclf/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Ok(Self {
            public_ports: client(true)?,
            other_ports: client(false)?,
            lookup,
            policy,
        })
    }

    /// Parses a URL `validate_callback_url` accepted, as the client will read it.
    fn target(&self, url: &str) -> Result<Target, NotifyError> {
        let refused = |why: String| NotifyError::Refused(why);
        validate_callback_url(url)?;
        let url = Url::parse(url).map_err(|e| refused(format!("not a valid URL: {e}")))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| refused("not a valid URL".into()))?;
        // The parser has already read any IPv4 form (decimal, octal, hex) into dotted decimal,
        // the form reqwest tests for a literal before it would resolve a name.
        let host = url
            .host_str()
            .ok_or_else(|| refused("the URL has no host".into()))?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        Ok(Target { url, port, literal })
    }

    /// Whether every address `url`'s host has now may be reached on its port: asked when a
    /// URL is accepted, so a refused one is a 422 then rather than a failure later.
    pub(super) async fn check(&self, url: &str) -> Result<(), NotifyError> {
        let target = self.target(url)?;
        let addresses: Vec<IpAddr> = match (target.literal, target.url.host_str()) {
            (Some(ip), _) => vec![ip],
            (None, Some(host)) => match (self.lookup)(host.to_string()).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::debug!(%host, %error, "host does not resolve");
                    return Err(NotifyError::Refused(REFUSED_ADDRESS.into()));
                }
            },
            (None, None) => return Err(NotifyError::Refused("the URL has no host".into())),
        };
        let refused: Vec<&IpAddr> = addresses
            .iter()
            .filter(|ip| {
                !self
                    .policy
                    .allows_socket(SocketAddr::new(**ip, target.port))
            })
            .collect();
        if addresses.is_empty() || !refused.is_empty() {
            // The addresses stay in the log: the client learns nothing of the network.
            tracing::debug!(
                host = target.url.host_str(),
                port = target.port,
                ?refused,
                "URL refused"
            );
            return Err(NotifyError::Refused(REFUSED_ADDRESS.into()));
        }
        Ok(())
    }

    /// The URL and the client that may connect to it: names are judged by that client's
    /// resolver, an IP literal here.
    pub(super) fn request_target(&self, url: &str) -> Result<(Url, &reqwest::Client), NotifyError> {
        let target = self.target(url)?;
        if let Some(ip) = target.literal {
            if !self.policy.allows_socket(SocketAddr::new(ip, target.port)) {
                tracing::debug!(%ip, port = target.port, "address refused at connection");
                return Err(NotifyError::Refused(REFUSED_ADDRESS.into()));
            }
        }
        let client = if PUBLIC_PORTS.contains(&target.port) {
            &self.public_ports
        } else {
            &self.other_ports
        };
        Ok((target.url, client))
    }

    /// A request's failure: the resolver's refusal (final), or a network error (may pass).
    pub(super) fn failed(error: reqwest::Error) -> NotifyError {
        if refused_by_resolver(&error) {
            tracing::debug!("address refused at connection");
            return NotifyError::Refused(REFUSED_ADDRESS.into());
        }
        NotifyError::Attempt {
            status: None,
            retryable: true,
            source: error.without_url().into(),
        }
    }
}

/// Why an image could not be fetched from a client's URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL may not be fetched; the reason is safe to show the client.
    #[error("image_url refused: {0}")]
    Refused(String),
    /// The image is larger than the upload limit.
    #[error("the image at image_url is larger than the limit of {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The server answered with an error, or could not be reached in time.
    #[error("the image could not be fetched from image_url: {0}")]
    Failed(String),
}

/// Fetches images from clients' URLs (`image_url`), under the callbacks' address policy, with
/// the upload's size limit and a time limit.
pub struct UrlFetcher {
    client: GuardedClient,
    max_bytes: usize,
}

impl UrlFetcher {
    /// A fetcher that reaches what `policy` allows, gives each fetch `timeout` and refuses
    /// images over `max_bytes`.
    pub fn new(
        policy: CallbackPolicy,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Self, FetchError> {
        let client = GuardedClient::new(policy, timeout, system_lookup())
            .map_err(|e| FetchError::Failed(e.to_string()))?;
        Ok(Self { client, max_bytes })
    }

    /// The bytes at `url` (GET, a 2xx answer, redirects not followed).
    pub async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        let refused = |error: NotifyError| match error {
            NotifyError::Refused(why) => FetchError::Refused(why),
            other => FetchError::Failed(other.to_string()),
        };
        self.client.check(url).await.map_err(refused)?;
        let (url, client) = self.client.request_target(url).map_err(refused)?;
        let mut response = client
            .get(url)
            .send()
            .await
            .map_err(|e| refused(GuardedClient::failed(e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Failed(format!("HTTP {status}")));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge {
                max: self.max_bytes,
            });
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Failed(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge {
                    max: self.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}
