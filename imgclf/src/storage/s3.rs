//! Objects in S3 or any S3-compatible service (MinIO, Ceph, …), through `object_store`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

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
    /// Without explicit keys the credentials come from the standard AWS chain: the `AWS_*`
    /// variables, web identity (EKS service accounts), container credentials (ECS, EKS Pod
    /// Identity) and the instance's metadata service.
    pub async fn connect(config: S3Config) -> Result<Self, StorageError> {
        let mut builder = AmazonS3Builder::from_env()
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
        if let Err(error) = create_bucket(&store, &config).await {
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

/// `PUT /bucket` (CreateBucket). `object_store` has no bucket API, but its signer presigns a
/// request for the bucket's own URL with whatever credentials its chain found, so this needs no
/// signing code of its own. An existing bucket (409) is success.
async fn create_bucket(store: &AmazonS3, config: &S3Config) -> Result<(), String> {
    let url = store
        .signed_url(
            reqwest::Method::PUT,
            &Path::from(""),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| e.to_string())?;
    let body = if config.region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
            config.region
        )
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .put(url)
        // Sent even when 0: servers answer an empty PUT without it with 411.
        .header(reqwest::header::CONTENT_LENGTH, body.len())
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    match response.status().as_u16() {
        200..=299 | 409 => Ok(()),
        status => Err(format!("HTTP {status}")),
    }
}
