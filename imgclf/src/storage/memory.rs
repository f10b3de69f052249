use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Storage, StorageError};

/// Objects in a map: for tests, examples and benches.
#[derive(Default)]
pub struct MemoryStorage {
    objects: Mutex<HashMap<String, Bytes>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Objects stored.
    pub fn len(&self) -> usize {
        self.objects.lock().unwrap().len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        validate_key(key)?;
        self.objects.lock().unwrap().insert(key.to_string(), bytes);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        validate_key(key)?;
        let objects = self.objects.lock().unwrap();
        objects
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(key.to_string()))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        validate_key(key)?;
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }

    async fn check(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
