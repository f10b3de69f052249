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
