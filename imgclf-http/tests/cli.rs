//! The binary's own settings: `--help` never shows a credential.

use std::process::Command;

#[test]
fn help_never_shows_a_secret_value() {
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-http"))
        .arg("--help")
        .env("IMGCLF_API_KEYS", "s3cret-a,s3cret-b")
        .env("IMGCLF_QUEUE", "redis://:s3cret-c@redis:6379")
        .env("IMGCLF_RESULTS", "postgres://app:s3cret-d@db/imgclf")
        .env("IMGCLF_S3_SECRET_KEY", "s3cret-e")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("IMGCLF_API_KEYS"), "{help}");
    assert!(!help.contains("s3cret"), "{help}");
}

/// Every setting `--help` names is in `.env.example` (which says it lists them all) and in the
/// README's table.
#[test]
fn every_setting_is_in_the_example_env_file_and_the_readme() {
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-http"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let settings: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect();
    assert!(settings.len() > 30, "{help}");
    for var in settings {
        assert!(
            example.contains(&format!("{var}=")),
            "{var} is not in .env.example"
        );
        assert!(
            readme.contains(&format!("`{var}`")),
            "{var} is not in the README"
        );
    }
}

#[test]
fn healthcheck_exits_0_for_a_live_server_and_1_for_a_dead_one() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let live = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            let mut request = [0u8; 512];
            let n = stream.read(&mut request).unwrap_or(0);
            let asked_health = String::from_utf8_lossy(&request[..n]).starts_with("GET /health ");
            let status = if asked_health {
                "200 OK"
            } else {
                "404 Not Found"
            };
            // In pieces, as a server may send it: the probe reads to the status line's end.
            for piece in ["HTTP/1.1 ", status, "\r\nContent-Length: 0\r\n\r\n"] {
                let _ = stream.write_all(piece.as_bytes());
                let _ = stream.flush();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    });
    let run = |addr: String| {
        Command::new(env!("CARGO_BIN_EXE_imgclf-http"))
            .arg("healthcheck")
            .env("IMGCLF_ADDR", addr)
            .output()
            .unwrap()
    };
    let ok = run(live.to_string());
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = run(dead.to_string());
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
}

/// Runs the binary with `env` and a data directory of its own; its exit status and stderr.
fn run_with(env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-http"))
        .env("IMGCLF_DATA_DIR", dir.path().join("data"))
        .env("IMGCLF_ADDR", "127.0.0.1:0")
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

#[test]
fn a_bad_setting_is_one_clear_line_and_a_failed_exit() {
    for (env, says) in [
        (
            (
                "IMGCLF_RESULTS",
                "postgress://app:s3cret@db/x?password=s3cret",
            ),
            "unsupported URL",
        ),
        (("IMGCLF_API_KEYS", " , "), "IMGCLF_API_KEYS holds no key"),
        (
            ("IMGCLF_CORS_ORIGINS", "https://app.example/"),
            "not an origin",
        ),
        (
            ("IMGCLF_WEBHOOK_TIMEOUT", "18446744073709551615"),
            "webhook-timeout",
        ),
        (("IMGCLF_MAX_BATCH", "0"), "max-batch"),
        (
            ("IMGCLF_MODEL", "/nonexistent/model.json"),
            "cannot read /nonexistent/model.json",
        ),
    ] {
        let (ok, stderr) = run_with(&[env]);
        assert!(!ok, "{env:?} is refused");
        assert!(stderr.contains(says), "{env:?}: {stderr}");
        for never in ["panicked", "stack backtrace", "Caused by", "s3cret"] {
            assert!(!stderr.contains(never), "{env:?}: {stderr}");
        }
        // Without the logs' lines, the reason is one line.
        let reason: Vec<&str> = (stderr.lines())
            .filter(|l| l.starts_with("imgclf-http: ") || l.starts_with("error:"))
            .collect();
        assert_eq!(reason.len(), 1, "{env:?}: {stderr}");
    }
}
