//! Any bytes through the upload check and, when accepted, decode + preprocess: a tensor or a
//! clean error, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 4_000_000;

fuzz_target!(|data: &[u8]| {
    if imgclf::preprocess::validate(data, MAX_PIXELS).is_ok() {
        let transform = imgclf::Transform::default();
        if let Ok(tensor) = transform.tensor_from_bytes(data, MAX_PIXELS) {
            assert_eq!(tensor.len(), transform.tensor_len());
        }
    }
});
