//! S3 credentials from the standard AWS chain: with no `IMGCLF_S3_*` keys, the `AWS_*`
//! variables are used (the bucket is created and images stored with them), and wrong ones are
//! refused. Against s3s-fs, which checks every signature.

mod common;

use std::time::Duration;

use common::*;

fn env(
    port: u16,
    endpoint: &str,
    bucket: &str,
    secret: &str,
    work: &std::path::Path,
) -> Vec<(String, String)> {
    [
        ("IMGCLF_ADDR", format!("127.0.0.1:{port}")),
        ("IMGCLF_DATA_DIR", work.join("data").display().to_string()),
        ("IMGCLF_STORAGE", format!("s3://{bucket}")),
        ("IMGCLF_S3_ENDPOINT", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
        // Nothing to find there on a test machine; without it the chain's last step would wait.
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[tokio::test]
async fn s3_credentials_come_from_the_aws_chain_when_no_keys_are_set() {
    let Some(endpoint) = imgclf_test_support::service_url("IMGCLF_TEST_S3_SECOND") else {
        return;
    };
    let secret = std::env::var("IMGCLF_TEST_S3_SECRET_KEY").unwrap_or_else(|_| "testtest".into());
    let work = tempfile::tempdir().unwrap();
    let bucket = imgclf_test_support::unique_name("imgclf-chain");
    let client = reqwest::Client::new();

    let port = free_port();
    let mut http = spawn(
        &http_binary(),
        &env(port, &endpoint, &bucket, &secret, work.path()),
        work.path(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&client, &base).await;
    let (name, label, bytes) = &reference_images()[0];
    let (status, id) = upload(&client, &base, name, bytes).await;
    assert_eq!(
        status, 202,
        "the image was stored with the chain's credentials"
    );
    let done = task_status(&client, &base, &format!("{}?wait=30", id.unwrap())).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    assert_eq!(done["result"]["classification"][0]["label"], label.as_str());
    http.signal("-TERM");
    assert!(http.exits_cleanly(Duration::from_secs(20)).await);

    // The same with a wrong secret: the server refuses every request, so the process is up
    // but never ready.
    let port = free_port();
    let _wrong = spawn(
        &http_binary(),
        &env(port, &endpoint, &bucket, "wrong-secret", work.path()),
        work.path(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let mut answered = None;
    for _ in 0..300 {
        if let Ok(response) = client.get(format!("{base}/ready")).send().await {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if body.contains("storage") || status == 200 {
                answered = Some((status, body));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = answered.expect("the process answers /ready");
    assert_eq!(status, 503, "a wrong secret is not accepted: {body}");
}
