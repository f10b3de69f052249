//! The webhook client against real loopback sockets: what it signs, where it refuses to
//! connect (at upload and again at delivery), and what it will not be talked into (redirects,
//! proxies from the environment, unsigned callbacks nobody asked for).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hmac::Mac;
use imgclf::notify::{
    self, CallbackPolicy, NotifierOptions, NotifyError, WebhookConfig, WebhookNotifier,
    DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use imgclf::Notifier;
use serde_json::json;

const SECRET: &str = "webhook-test-secret";

/// What a receiver saw of one request.
#[derive(Clone)]
struct Seen {
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// An axum receiver on 127.0.0.1 that records every request and answers with `answer`.
async fn receiver<F, R>(answer: F) -> (String, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn() -> R + Clone + Send + Sync + 'static,
    R: IntoResponse + Send + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = Router::new().fallback(move |headers: HeaderMap, body: bytes::Bytes| {
        let (record, answer) = (record.clone(), answer.clone());
        async move {
            record.lock().unwrap().push(Seen { headers, body });
            answer()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// A raw listener on 127.0.0.1 that only counts the connections it accepts.
async fn counter() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, connections)
}

fn config(allow: &[&str]) -> WebhookConfig {
    WebhookConfig {
        timeout: Duration::from_secs(5),
        secret: Some(SECRET.into()),
        policy: CallbackPolicy::new(allow.iter().map(|n| n.parse().unwrap()).collect()),
        ..WebhookConfig::default()
    }
}

fn webhooks(allow: &[&str]) -> WebhookNotifier {
    WebhookNotifier::new(config(allow)).unwrap()
}

fn payload() -> serde_json::Value {
    json!({"task_id": "00000000-0000-0000-0000-000000000001", "state": "SUCCESS"})
}

fn is_refused(result: &Result<impl std::fmt::Debug, NotifyError>) -> bool {
    matches!(result, Err(NotifyError::Refused(_)))
}

#[tokio::test]
async fn a_loopback_receiver_verifies_the_v2_signature() {
    let (base, seen) = receiver(|| StatusCode::NO_CONTENT).await;
    let notifier = webhooks(&["127.0.0.1"]);
    let url = format!("{base}/hook");
    notifier.check_url(&url).await.unwrap();
    notifier.deliver(&url, &payload(), "d-1").await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    let header = |name: &str| request.headers[name].to_str().unwrap().to_string();
    let (delivery, timestamp) = (header(DELIVERY_HEADER), header(TIMESTAMP_HEADER));
    // What a receiver does (see the README): HMAC-SHA256 over
    // "<delivery id>.<timestamp>.<raw body>" with the shared secret.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{delivery}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v2={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header(SIGNATURE_HEADER), expected);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&request.body).unwrap(),
        payload()
    );
    // The delivery id is signed: a replay under another id does not verify.
    let mut other = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    other.update(format!("another-id.{timestamp}.").as_bytes());
    other.update(&request.body);
    assert_ne!(
        header(SIGNATURE_HEADER),
        format!("v2={}", hex::encode(other.finalize().into_bytes()))
    );
}

#[tokio::test]
async fn one_attempt_signs_the_delivery_id_it_is_given() {
    let (base, seen) = receiver(|| StatusCode::NO_CONTENT).await;
    let notifier = webhooks(&["127.0.0.1"]);
    let url = format!("{base}/hook");
    notifier.deliver(&url, &payload(), "task-42").await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let header = |name: &str| seen[0].headers[name].to_str().unwrap().to_string();
    assert_eq!(header(DELIVERY_HEADER), "task-42");
    let timestamp = header(TIMESTAMP_HEADER);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("task-42.{timestamp}.").as_bytes());
    mac.update(&seen[0].body);
    assert_eq!(
        header(SIGNATURE_HEADER),
        format!("v2={}", hex::encode(mac.finalize().into_bytes()))
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (target, followed) = receiver(|| StatusCode::NO_CONTENT).await;
    let location = format!("{target}/elsewhere");
    let (base, redirecting) = receiver(move || {
        (
            StatusCode::FOUND,
            [(axum::http::header::LOCATION, location.clone())],
        )
    })
    .await;
    let notifier = webhooks(&["127.0.0.1"]);
    match notifier
        .deliver(&format!("{base}/hook"), &payload(), "d-1")
        .await
    {
        Err(NotifyError::Attempt {
            status, retryable, ..
        }) => {
            assert_eq!(status, Some(302));
            assert!(!retryable, "a redirect will not change on a retry");
        }
        other => panic!("a redirect is a failure, not a delivery: {other:?}"),
    }
    assert_eq!(redirecting.lock().unwrap().len(), 1, "one request");
    assert!(
        followed.lock().unwrap().is_empty(),
        "the redirect's target got nothing"
    );
}

#[tokio::test]
async fn an_ip_literal_to_a_refused_address_is_refused_at_delivery() {
    let (port, connections) = counter().await;
    // The allowlist does not name loopback: every spelling of it is refused, at upload and,
    // had a URL slipped past that check, at delivery too, before any connection.
    let notifier = webhooks(&["10.9.9.9"]);
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://2130706433:{port}/hook"), // 127.0.0.1 in decimal
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        "http://127.0.0.1/hook".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[2002:7f00:1::1]/hook".to_string(),
    ] {
        assert!(is_refused(&notifier.check_url(&url).await), "{url}");
        let started = Instant::now();
        let result = notifier.deliver(&url, &payload(), "d-1").await;
        assert!(is_refused(&result), "{url}: {result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{url}: no retry"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing reached loopback"
    );
}

#[tokio::test]
async fn a_custom_port_on_a_public_address_is_refused() {
    let notifier = webhooks(&[]);
    // A public address takes ports 80 and 443 (checked without connecting: it is a literal).
    notifier
        .check_url("http://93.184.216.34/hook")
        .await
        .unwrap();
    notifier
        .check_url("https://93.184.216.34:443/hook")
        .await
        .unwrap();
    for url in [
        "http://93.184.216.34:8080/hook",
        "https://93.184.216.34:8443/hook",
        "http://93.184.216.34:22/",
        "http://[2606:4700:4700::1111]:8080/",
    ] {
        assert!(is_refused(&notifier.check_url(url).await), "{url}");
        let started = Instant::now();
        let result = notifier.deliver(url, &payload(), "d-1").await;
        assert!(is_refused(&result), "{url}: {result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{url}: no attempt"
        );
    }
    // An allowlisted network takes any port, public or not.
    let allowed = webhooks(&["93.184.216.0/24"]);
    allowed
        .check_url("http://93.184.216.34:8080/hook")
        .await
        .unwrap();
}

#[tokio::test]
async fn refusals_do_not_echo_addresses() {
    let notifier = webhooks(&[]);
    for url in [
        "http://localhost:8000/hook",
        "http://127.0.0.1:8000/hook",
        "http://[::1]/hook",
    ] {
        let error = notifier.check_url(url).await.unwrap_err();
        let shown = error.to_string();
        assert!(shown.starts_with("callback URL refused: "), "{shown}");
        for address in ["127.0.0.1", "::1", "localhost"] {
            assert!(!shown.contains(address), "{url}: {shown}");
        }
    }
}

#[tokio::test]
async fn proxy_variables_in_the_environment_are_ignored() {
    let (proxy_port, proxied) = counter().await;
    let (base, seen) = receiver(|| StatusCode::NO_CONTENT).await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    // The client reads the environment when it is built: set it just for that, and put it
    // back at once (no other test in this file reads these variables).
    let names = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ];
    let saved: Vec<_> = names.iter().map(|n| (*n, std::env::var_os(n))).collect();
    for name in &names[..6] {
        std::env::set_var(name, &proxy);
    }
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let notifier = webhooks(&["127.0.0.1"]);
    for (name, value) in saved {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }

    let result = notifier
        .deliver(&format!("{base}/hook"), &payload(), "d-1")
        .await;
    assert_eq!(proxied.load(Ordering::SeqCst), 0, "{result:?}");
    result.unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "delivered straight to the receiver"
    );
}

#[tokio::test]
async fn unsigned_callbacks_need_the_setting() {
    let (base, seen) = receiver(|| StatusCode::NO_CONTENT).await;
    let url = format!("{base}/hook");
    let options = |unsigned| NotifierOptions {
        attempts: 1,
        timeout: Duration::from_secs(5),
        secret: None,
        allow: vec!["127.0.0.1".parse().unwrap()],
        unsigned,
    };

    let refusing = notify::build(&options(false)).unwrap();
    let error = refusing.check_url(&url).await.unwrap_err();
    assert!(matches!(error, NotifyError::Refused(_)), "{error}");
    assert!(error.to_string().contains("secret"), "{error}");
    assert!(
        is_refused(&refusing.deliver(&url, &payload(), "d-1").await),
        "nor sent later"
    );
    assert!(seen.lock().unwrap().is_empty());

    let unsigned = notify::build(&options(true)).unwrap();
    unsigned.check_url(&url).await.unwrap();
    unsigned.deliver(&url, &payload(), "d-1").await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key(SIGNATURE_HEADER),
        "sent unsigned, as asked"
    );

    // A WebhookConfig without a secret is refused the same way unless `unsigned` is set.
    let direct = WebhookNotifier::new(WebhookConfig {
        secret: None,
        ..config(&["127.0.0.1"])
    })
    .unwrap();
    assert!(is_refused(&direct.check_url(&url).await));
}
