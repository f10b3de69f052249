//! Objects in S3 or any S3-compatible service (MinIO, Ceph, …), through `object_store`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};

use super::{validate_key, Storage, StorageError};

use super::S3Config;

/// Objects in one bucket.
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    bucket: String,
}

fn backend(error: object_store::Error) -> StorageError {
    match error {
        object_store::Error::NotFound { path, .. } => StorageError::NotFound(path),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::NotSupported { .. } => StorageError::permanent(error),
        other => StorageError::temporary(other),
    }
}

impl S3Storage {
    /// Builds the client and creates the bucket if it is missing and the server allows it.
    pub async fn connect(config: S3Config) -> Result<Self, StorageError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(key), Some(secret)) = (&config.access_key, &config.secret_key) {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        let store = builder.build().map_err(StorageError::permanent)?;
        if let Err(error) = create_bucket(&config).await {
            tracing::warn!(bucket = %config.bucket, %error, "could not create the bucket; assuming it exists");
        }
        Ok(Self {
            store: Arc::new(store),
            bucket: config.bucket,
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        validate_key(key)?;
        self.store
            .put(&Path::from(key), PutPayload::from(bytes))
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        validate_key(key)?;
        let object = self
            .store
            .get(&Path::from(key))
            .await
            .map_err(|e| match backend(e) {
                StorageError::NotFound(_) => StorageError::NotFound(key.to_string()),
                other => other,
            })?;
        object.bytes().await.map_err(backend)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        validate_key(key)?;
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    /// The bucket answers: a missing probe object is a fine answer.
    async fn check(&self) -> Result<(), StorageError> {
        match self.store.head(&Path::from(".imgclf-ready")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }
}

/// `PUT /bucket`, signed with AWS Signature V4. `object_store` has no bucket API, and this one
/// request does not justify an SDK. An existing bucket (409) is success.
async fn create_bucket(config: &S3Config) -> Result<(), String> {
    let (Some(endpoint), Some(access_key), Some(secret_key)) =
        (&config.endpoint, &config.access_key, &config.secret_key)
    else {
        return Err("bucket creation needs an endpoint and credentials".into());
    };
    let endpoint = endpoint.trim_end_matches('/');
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let path = format!("/{}", config.bucket);
    let body = if config.region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
            config.region
        )
    };
    let payload_hash = hex::encode(Sha256::digest(body.as_bytes()));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let (date, stamp) = amz_dates(now);
    let canonical = format!(
        "PUT\n{path}\n\nhost:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{stamp}\n\n\
         host;x-amz-content-sha256;x-amz-date\n{payload_hash}"
    );
    let scope = format!("{date}/{}/s3/aws4_request", config.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical))
    );
    let mut key = hmac(format!("AWS4{secret_key}").as_bytes(), date.as_bytes());
    for part in [config.region.as_str(), "s3", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/{scope}, \
         SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .put(format!("{endpoint}{path}"))
        .header("x-amz-date", stamp)
        .header("x-amz-content-sha256", payload_hash)
        .header("authorization", authorization)
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    match response.status().as_u16() {
        200..=299 | 409 => Ok(()),
        status => Err(format!("HTTP {status}")),
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `(YYYYMMDD, YYYYMMDDTHHMMSSZ)` for a Unix time, in UTC.
fn amz_dates(unix: u64) -> (String, String) {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    let stamp = format!(
        "{date}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
    (date, stamp)
}

#[cfg(test)]
mod tests {
    use super::amz_dates;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(amz_dates(0), ("19700101".into(), "19700101T000000Z".into()));
        assert_eq!(
            amz_dates(1_709_210_096),
            ("20240229".into(), "20240229T123456Z".into())
        );
    }
}
