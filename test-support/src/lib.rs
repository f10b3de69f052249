//! Support shared by every test suite of the workspace (the root package's tests, examples and
//! benches, and `imgclf-http`'s end-to-end tests): where the shared test images and models are,
//! the reference results computed for them by an independent implementation, the real services
//! to test against, and fresh names and databases on them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

/// `../shared` beside the repository, or `IMGCLF_SHARED_DIR`, canonical: WebDriver refuses file
/// paths with `..` in them.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("IMGCLF_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
    dir.canonicalize().unwrap_or(dir)
}

/// The shipped default model.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/efficientnet-lite0"
    ))
}

/// The random-weight ResNet18 graph in the shared models.
pub fn resnet18_dir() -> PathBuf {
    shared_dir().join("models/resnet18-random-init")
}

/// One reference prediction.
#[derive(Clone, Debug)]
pub struct Expected {
    pub class_id: usize,
    pub label: String,
    pub probability: f32,
}

/// Image file name -> reference top-5, for `reference-<model>.json`.
pub fn reference(model: &str) -> BTreeMap<String, Vec<Expected>> {
    let path = shared_dir().join(format!("images/reference-{model}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("reference JSON");
    let top5 = json["top5"].as_object().expect("top5 object");
    top5.iter()
        .map(|(image, predictions)| {
            let predictions = predictions
                .as_array()
                .expect("a list of predictions")
                .iter()
                .map(|p| Expected {
                    class_id: p["class_id"].as_u64().expect("class_id") as usize,
                    label: p["label"].as_str().expect("label").to_string(),
                    probability: p["probability"].as_f64().expect("probability") as f32,
                })
                .collect();
            (image.clone(), predictions)
        })
        .collect()
}

/// The bytes of a shared test image.
pub fn image(name: &str) -> Vec<u8> {
    let path = shared_dir().join("images").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Packed RGB8 rows (`width` x `height`) encoded as JPEG by libjpeg at `quality`, with chroma
/// `sampling` (pixels per Cb/Cr sample) and, if asked, progressive scans.
pub fn encode_jpeg(
    rgb: &[u8],
    (width, height): (usize, usize),
    quality: f32,
    sampling: (u8, u8),
    progressive: bool,
) -> Vec<u8> {
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_size(width, height);
    compress.set_quality(quality);
    compress.set_chroma_sampling_pixel_sizes(sampling, sampling);
    if progressive {
        compress.set_progressive_mode();
    }
    let mut started = compress.start_compress(Vec::new()).unwrap();
    started.write_scanlines(rgb).unwrap();
    started.finish().unwrap()
}

/// Packed RGB8 rows (`width` x `height`) as a CMYK JPEG (black taken out as far as it goes),
/// its inks inverted as Adobe's applications store them, encoded by libjpeg at quality 90,
/// with progressive scans if asked.
pub fn encode_cmyk_jpeg(rgb: &[u8], (width, height): (usize, usize), progressive: bool) -> Vec<u8> {
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    compress.set_size(width, height);
    compress.set_quality(90.0);
    if progressive {
        compress.set_progressive_mode();
    }
    let inks: Vec<u8> = rgb
        .chunks_exact(3)
        .flat_map(|p| {
            let k = 255 - p[0].max(p[1]).max(p[2]);
            [255 - p[0] - k, 255 - p[1] - k, 255 - p[2] - k, k].map(|v| 255 - v)
        })
        .collect();
    let mut started = compress.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&inks).unwrap();
    started.finish().unwrap()
}

/// Inserts an EXIF APP1 segment with `orientation` right after a JPEG's SOI marker.
pub fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// The URL of a real service for a test, from the environment variable `var`. `None` (the test
/// is skipped, and says so) when unset, except under CI, where every service must be tested.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("CI must test every backend: set {var}"),
        _ => {
            eprintln!("skipped: set {var} to run this test against a real service");
            None
        }
    }
}

/// A name no other test run uses: for databases, queues and buckets.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh PostgreSQL database on the server of `base_url`; returns its URL.
pub async fn fresh_postgres_database(base_url: &str) -> String {
    use sqlx::Connection;
    let name = unique_name("imgclf_test").replace('-', "_");
    let mut conn = sqlx::PgConnection::connect(base_url)
        .await
        .expect("PostgreSQL reachable");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (server, _) = base_url.rsplit_once('/').expect("a database URL");
    format!("{server}/{name}")
}

/// Every shared image with its reference top-1 label: (file name, label, bytes).
pub fn reference_images() -> Vec<(String, String, Vec<u8>)> {
    reference("efficientnet-lite0")
        .into_iter()
        .map(|(name, top)| {
            let bytes = image(&name);
            (name, top[0].label.clone(), bytes)
        })
        .collect()
}
