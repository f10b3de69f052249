//! The server loop: slow and idle clients cannot hold connections.

use std::time::{Duration, Instant};

use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads until the server closes the connection (or 5 s pass); returns what came and when the
/// connection closed.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buffer = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buffer[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/", get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(imgclf_http::serve(
        listener,
        app,
        Duration::from_millis(300),
        async {
            let _ = stopped.await;
        },
    ));

    // A whole request is answered, and the idle keep-alive connection is closed after it.
    let mut whole = TcpStream::connect(address).await.unwrap();
    whole
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed_after) = read_until_closed(&mut whole).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed_after < Duration::from_secs(3),
        "an idle connection stays open {closed_after:?}"
    );

    // Half a request head, then silence: the connection is closed, not held.
    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: te").await.unwrap();
    let (_, closed_after) = read_until_closed(&mut slow).await;
    assert!(
        closed_after < Duration::from_secs(3),
        "a client that never finishes its head holds the connection {closed_after:?}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap();
}
