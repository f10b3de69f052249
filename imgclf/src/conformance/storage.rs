use bytes::Bytes;

use crate::storage::{Storage, StorageError};

/// Every storage check, on a store that may hold other objects but none under `prefix`.
pub async fn run(store: &dyn Storage, prefix: &str) {
    round_trip(store, prefix).await;
    overwrite_and_delete(store, prefix).await;
    missing_keys(store, prefix).await;
    refuses_unsafe_keys(store).await;
    store
        .check()
        .await
        .expect("a working store passes its check");
}

async fn round_trip(store: &dyn Storage, prefix: &str) {
    let key = format!("{prefix}/images/a.jpg");
    let bytes: Bytes = (0..=255u8).cycle().take(300_000).collect::<Vec<_>>().into();
    store.put(&key, bytes.clone()).await.expect("put");
    assert_eq!(
        store.get(&key).await.expect("get"),
        bytes,
        "get returns what put stored"
    );
    let empty = format!("{prefix}/empty");
    store
        .put(&empty, Bytes::new())
        .await
        .expect("put of an empty object");
    assert!(store.get(&empty).await.expect("get").is_empty());
}

async fn overwrite_and_delete(store: &dyn Storage, prefix: &str) {
    let key = format!("{prefix}/b.png");
    store
        .put(&key, Bytes::from_static(b"first"))
        .await
        .expect("put");
    store
        .put(&key, Bytes::from_static(b"second"))
        .await
        .expect("overwrite");
    assert_eq!(
        store.get(&key).await.expect("get"),
        Bytes::from_static(b"second")
    );
    store.delete(&key).await.expect("delete");
    assert!(
        matches!(store.get(&key).await, Err(StorageError::NotFound(_))),
        "deleted is gone"
    );
    store
        .delete(&key)
        .await
        .expect("deleting a missing key is not an error");
}

async fn missing_keys(store: &dyn Storage, prefix: &str) {
    let key = format!("{prefix}/never-written");
    match store.get(&key).await {
        Err(StorageError::NotFound(k)) => assert_eq!(k, key),
        other => panic!("a missing key must be NotFound, got {other:?}"),
    }
    // The expiry sweeper deletes images that may be gone already, or were never stored.
    store
        .delete(&format!("{prefix}/never/written/at-all.jpg"))
        .await
        .expect("deleting a key never written is not an error");
}

async fn refuses_unsafe_keys(store: &dyn Storage) {
    for key in [
        "",
        "../escape",
        "a/../../b",
        "/absolute",
        "a//b",
        "spaces here",
        "a\0b",
    ] {
        assert!(
            matches!(
                store.put(key, Bytes::from_static(b"x")).await,
                Err(StorageError::InvalidKey(_))
            ),
            "key {key:?} must be refused"
        );
    }
}
