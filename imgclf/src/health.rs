//! The probe behind the binaries' `healthcheck` subcommand: a container's health check runs the
//! binary itself, so the image needs no shell tools (`curl`, `/dev/tcp`) to ask a process
//! whether it is alive.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Asks `GET <path>` of the process listening on `addr` (a wildcard address means this host)
/// and succeeds on a 200 within `timeout`.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    // The status line may arrive in pieces: read until its end, the answer's end or 64 bytes.
    let mut head = Vec::with_capacity(64);
    let mut piece = [0u8; 64];
    while head.len() < 64 && !head.contains(&b'\n') {
        let read = stream
            .read(&mut piece)
            .map_err(|e| format!("{addr}: {e}"))?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&piece[..read.min(64 - head.len())]);
    }
    let status_line = String::from_utf8_lossy(&head);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("{addr}{path} answered {status}")),
        None => Err(format!("{addr}{path} gave no HTTP answer")),
    }
}
