//! What clients build on: bulk uploads, uploads by URL, the task listing on every result
//! store, and the generated OpenAPI document (with `/docs`), on the real model.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use imgclf::notify::NoopNotifier;
use imgclf::results::{MemoryResults, SqliteResults};
use imgclf::{PipelineConfig, ResultStore, TaskId, TaskRecord};
use imgclf_http::{router, AppState};
use imgclf_suite::image;
use serde_json::Value;
use tower::ServiceExt;

#[tokio::test]
async fn a_bulk_upload_accepts_the_good_files_and_says_why_the_bad_one_was_refused() {
    let s = service();
    let (apple, dog) = (image("opencv_apple.jpg"), image("darknet_dog.jpg"));
    let request = multipart(
        "/api/upload-images",
        &[
            Part::Text("metadata", r#"{"batch": "b-1"}"#),
            Part::File("apple.jpg", &apple),
            Part::File("notes.jpg", b"these are not the pixels you are looking for"),
            Part::File("dog.jpg", &dog),
        ],
    );
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tasks = body["tasks"].as_array().expect("a list of tasks");
    assert_eq!(tasks.len(), 3, "one item per file, in order: {body}");
    assert_eq!(tasks[0]["filename"], "apple.jpg");
    assert_eq!(tasks[1]["filename"], "notes.jpg");
    assert!(
        tasks[1]["detail"].as_str().unwrap().contains("JPEG"),
        "the refusal says what was wrong: {body}"
    );
    assert!(tasks[1].get("task_id").is_none());
    assert_eq!(
        tasks[1]["status"], 415,
        "what the single upload would answer: {body}"
    );
    assert!(tasks[1].get("retry_after").is_none(), "{body}");
    for (item, name) in [
        (&tasks[0], "opencv_apple.jpg"),
        (&tasks[2], "darknet_dog.jpg"),
    ] {
        let id = item["task_id"].as_str().expect("accepted");
        assert_eq!(item["status_url"], format!("/api/task-status/{id}"));
        let done = wait_final(&s.app, id).await;
        assert_eq!(done["state"], "SUCCESS", "{done}");
        assert_eq!(done["result"]["classification"][0]["label"], top1(name));
        assert_eq!(done["result"]["metadata"]["batch"], "b-1");
    }
    assert_eq!(s.storage.len(), 2, "the refused file left nothing behind");

    let (status, body) = call(&s.app, multipart("/api/upload-images", &[])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let bad_metadata = multipart(
        "/api/upload-images",
        &[Part::Text("metadata", "[1]"), Part::File("a.jpg", &apple)],
    );
    let (status, _) = call(&s.app, bad_metadata).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A callback URL this server would not call refuses the request, not file by file.
    let before = s.storage.len();
    for url in ["ftp://example.com/hook", "http://169.254.169.254/hook"] {
        let bad_callback = multipart(
            "/api/upload-images",
            &[Part::Text("callback_url", url), Part::File("a.jpg", &apple)],
        );
        let (status, body) = call(&s.app, bad_callback).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert!(body["detail"].is_string(), "{body}");
    }
    assert_eq!(s.storage.len(), before, "nothing stored");
}

/// A loopback server with a photo, a missing path, an oversized body and a redirect.
async fn image_server() -> String {
    use axum::response::Redirect;
    use axum::routing::get;
    let photo = image("opencv_apple.jpg");
    let big = vec![0xFFu8; MAX_UPLOAD + 1];
    let app = Router::new()
        .route("/photos/apple.jpg", get(move || async move { photo }))
        .route("/big.jpg", get(move || async move { big }))
        .route(
            "/redirect.jpg",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        );
    serve_locally(app).await
}

fn url_upload(url: &str) -> Request<Body> {
    multipart("/api/upload-image", &[Part::Text("image_url", url)])
}

#[tokio::test]
async fn an_image_url_is_fetched_from_an_allowlisted_host_and_refused_from_internal_ones() {
    let s = service();
    let base = image_server().await;
    let allowing = router(
        AppState::embedded(&s.pipeline, MAX_UPLOAD)
            .with_url_policy(&["127.0.0.1/32".parse().unwrap()], Duration::from_secs(5)),
        Duration::from_secs(30),
    );
    let (status, body) = call(&allowing, url_upload(&format!("{base}/photos/apple.jpg"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = wait_final(&allowing, body["task_id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    assert_eq!(
        done["result"]["classification"][0]["label"],
        top1("opencv_apple.jpg")
    );
    assert_eq!(done["filename"], "apple.jpg", "named after the URL's path");

    for (path, expected) in [
        ("/missing.jpg", StatusCode::UNPROCESSABLE_ENTITY),
        ("/big.jpg", StatusCode::PAYLOAD_TOO_LARGE),
        // Redirects are not followed: the next hop would escape the address policy.
        ("/redirect.jpg", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (status, body) = call(&allowing, url_upload(&format!("{base}{path}"))).await;
        assert_eq!(status, expected, "{path}: {body}");
    }

    // Without the allowlist, loopback is internal, and so is every other private address.
    let stored = s.storage.len();
    for url in [
        format!("{base}/photos/apple.jpg"),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://10.0.0.1/a.jpg".into(),
        "http://[::1]/a.jpg".into(),
        "http://localhost/a.jpg".into(),
        "file:///etc/passwd".into(),
        "http://user:secret@127.0.0.1/a.jpg".into(),
    ] {
        let (status, body) = call(&s.app, url_upload(&url)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert!(
            !body["detail"].as_str().unwrap().contains("127.0.0.1:"),
            "a refusal reveals no address: {body}"
        );
    }
    let both = multipart(
        "/api/upload-image",
        &[
            Part::Text("image_url", &format!("{base}/photos/apple.jpg")),
            Part::File("a.jpg", &image("opencv_apple.jpg")),
        ],
    );
    let (status, _) = call(&allowing, both).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "file or URL, not both"
    );
    assert_eq!(s.storage.len(), stored, "nothing refused was stored");
}

/// Seven tasks in the store, three of them failed, two succeeded.
async fn seven_tasks(results: &dyn ResultStore) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut metadata = serde_json::Map::new();
        metadata.insert("filename".into(), format!("photo-{i}.jpg").into());
        let id = TaskId::new();
        let mut record = TaskRecord::pending(id, format!("images/{id}.jpg"), metadata, None);
        // Two share each millisecond: pages must split ties without losing a task.
        record.created_at_ms += i / 2;
        results.create(&record).await.unwrap();
        if i < 3 {
            results.start(id).await.unwrap();
            results
                .fail(id, "the image could not be classified")
                .await
                .unwrap();
        } else if i < 5 {
            results.start(id).await.unwrap();
        }
        ids.push(id);
    }
    ids
}

/// Every page of `/api/tasks` with `filter`, `limit` at a time.
async fn every_page(app: &Router, filter: &str, limit: usize) -> Vec<Value> {
    let mut tasks = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut uri = format!("/api/tasks?limit={limit}{filter}");
        if let Some(cursor) = &cursor {
            uri.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = get(app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {page}");
        let items = page["tasks"].as_array().unwrap();
        assert!(items.len() <= limit);
        tasks.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return tasks,
        }
    }
    panic!("pagination does not end");
}

async fn listing_works_on(results: Arc<dyn ResultStore>) {
    let s = service_on(
        results.clone(),
        Arc::new(NoopNotifier),
        PipelineConfig::default(),
        false,
    );
    let ids = seven_tasks(results.as_ref()).await;
    let all = every_page(&s.app, "", 2).await;
    let listed: Vec<String> = all
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<(i64, String)> = Vec::new();
    for id in &ids {
        let record = results.get(*id).await.unwrap().unwrap();
        expected.push((record.created_at_ms, id.to_string()));
    }
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        listed, expected,
        "newest first, each task once across pages"
    );
    let first = all.iter().find(|t| t["filename"] == "photo-0.jpg").unwrap();
    assert_eq!(first["state"], "FAILURE");
    assert!(first["error"].is_string());
    assert!(
        first.get("object_key").is_none(),
        "storage keys stay inside"
    );

    for (filter, count) in [
        ("FAILURE", 3),
        ("STARTED", 2),
        ("PENDING", 2),
        ("SUCCESS", 0),
    ] {
        let page = every_page(&s.app, &format!("&state={filter}"), 1).await;
        assert_eq!(page.len(), count, "{filter}");
        assert!(page.iter().all(|t| t["state"] == filter), "{filter}");
    }
    let (status, summary) = get(&s.app, "/api/tasks/summary").await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(
        summary["counts"],
        serde_json::json!({"PENDING": 2, "STARTED": 2, "SUCCESS": 0, "FAILURE": 3})
    );
    assert_eq!(summary["queue_depth"], 0);
    assert_eq!(summary["dead_letters"], 0);

    let (status, page) = get(&s.app, "/api/tasks").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page["tasks"].as_array().unwrap().len(),
        7,
        "default page size"
    );
    assert!(page["next_cursor"].is_null());
    for bad in [
        "/api/tasks?state=DONE",
        "/api/tasks?limit=0",
        "/api/tasks?limit=201",
        "/api/tasks?limit=ten",
        "/api/tasks?cursor=12_not-a-task",
        "/api/tasks?cursor=nonsense",
    ] {
        let (status, body) = get(&s.app, bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_task_listing_pages_and_filters_in_memory() {
    listing_works_on(Arc::new(MemoryResults::new())).await;
}

#[tokio::test]
async fn the_task_listing_pages_and_filters_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
    listing_works_on(Arc::new(SqliteResults::connect(&url).await.unwrap())).await;
}

#[tokio::test]
async fn the_task_listing_pages_and_filters_on_postgres() {
    let Some(base) = imgclf_suite::service_url("IMGCLF_TEST_POSTGRES") else {
        return;
    };
    let url = imgclf_suite::fresh_postgres_database(&base).await;
    let store = imgclf::results::PostgresResults::connect(&url)
        .await
        .unwrap();
    listing_works_on(Arc::new(store)).await;
}

/// The documented status codes of each operation: `(METHOD path) -> {status}`.
fn documented(doc: &Value) -> BTreeMap<(String, String), BTreeSet<u16>> {
    let mut operations = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let statuses = operation["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|s| s.parse::<u16>().expect("numeric status"))
                .collect();
            operations.insert((method.to_uppercase(), path.clone()), statuses);
        }
    }
    operations
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_every_status_it_answers_with() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    // A queue already at its limit, for the 429.
    let config = PipelineConfig {
        max_queue_depth: 1,
        ..PipelineConfig::default()
    };
    let full = service_custom(Arc::new(NoopNotifier), config, false);
    let waiting = imgclf::Job {
        task_id: TaskId::new(),
        object_key: "images/waiting.jpg".into(),
        top_k: None,
        request_id: None,
    };
    imgclf::Queue::enqueue(full.queue.as_ref(), &waiting)
        .await
        .unwrap();
    let (status, doc) = get(&s.app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let operations = documented(&doc);
    let routes: BTreeSet<_> = operations.keys().cloned().collect();
    let served = [
        ("POST", "/api/upload-image"),
        ("POST", "/api/upload-images"),
        ("GET", "/api/task-status/{task_id}"),
        ("POST", "/api/classify"),
        ("GET", "/api/tasks"),
        ("GET", "/api/tasks/summary"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
    ];
    let served: BTreeSet<_> = served
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    // Every route but the files the page and /docs load, which are no API.
    assert_eq!(
        routes, served,
        "the document lists exactly the API's routes"
    );
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());

    // Provoke each answer a handler (or a layer in front of it) gives, and check it is
    // documented for that operation.
    let apple = image("opencv_apple.jpg");
    let task = TaskId::new();
    let keyed = router(
        AppState::embedded(&s.pipeline, MAX_UPLOAD).with_api_keys(&["k".into()]),
        Duration::from_secs(30),
    );
    let starved = AppState::embedded(&s.pipeline, MAX_UPLOAD).with_inflight_budget(1024);
    let _in_flight = starved.inflight_kib.clone().try_acquire_owned().unwrap();
    let starved = router(starved, Duration::from_secs(30));
    let upload = |parts: &[Part]| multipart("/api/upload-image", parts);
    let plain = |method: &str, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    };
    let big = vec![0u8; MAX_UPLOAD + 1];
    let cases: Vec<(&Router, (&str, &str), Request<Body>)> = vec![
        (
            &s.app,
            ("POST", "/api/upload-image"),
            upload(&[Part::File("a.jpg", &apple)]),
        ),
        (
            &full.app,
            ("POST", "/api/upload-image"),
            upload(&[Part::File("a.jpg", &apple)]),
        ),
        (
            &s.app,
            ("POST", "/api/upload-image"),
            plain("POST", "/api/upload-image"),
        ),
        (
            &s.app,
            ("POST", "/api/upload-image"),
            upload(&[Part::File("a.jpg", &big)]),
        ),
        (
            &s.app,
            ("POST", "/api/upload-image"),
            upload(&[Part::File("a.txt", b"text")]),
        ),
        (&s.app, ("POST", "/api/upload-image"), upload(&[])),
        (&keyed, ("POST", "/api/upload-image"), upload(&[])),
        (
            &starved,
            ("POST", "/api/upload-image"),
            upload(&[Part::File("a.jpg", &apple)]),
        ),
        (
            &s.app,
            ("POST", "/api/upload-images"),
            multipart("/api/upload-images", &[Part::File("a.jpg", &apple)]),
        ),
        (
            &s.app,
            ("POST", "/api/upload-images"),
            multipart("/api/upload-images", &[]),
        ),
        (
            &s.app,
            ("POST", "/api/upload-images"),
            plain("POST", "/api/upload-images"),
        ),
        (
            &keyed,
            ("POST", "/api/upload-images"),
            plain("POST", "/api/upload-images"),
        ),
        (
            &s.app,
            ("POST", "/api/classify"),
            multipart("/api/classify", &[Part::File("a.jpg", &apple)]),
        ),
        (
            &s.app,
            ("POST", "/api/classify"),
            multipart("/api/classify", &[Part::File("a.txt", b"text")]),
        ),
        (
            &s.app,
            ("POST", "/api/classify"),
            multipart("/api/classify", &[Part::Text("top_k", "0")]),
        ),
        (
            &s.app,
            ("POST", "/api/classify"),
            plain("POST", "/api/classify"),
        ),
        (
            &keyed,
            ("POST", "/api/classify"),
            plain("POST", "/api/classify"),
        ),
        (
            &s.app,
            ("GET", "/api/task-status/{task_id}"),
            plain("GET", &format!("/api/task-status/{task}")),
        ),
        (
            &s.app,
            ("GET", "/api/task-status/{task_id}"),
            plain("GET", &format!("/api/task-status/{task}?wait=31")),
        ),
        (
            &keyed,
            ("GET", "/api/task-status/{task_id}"),
            plain("GET", &format!("/api/task-status/{task}")),
        ),
        (
            &s.app,
            ("GET", "/api/task-status/{task_id}"),
            plain("GET", "/api/task-status/%FF"),
        ),
        (&s.app, ("GET", "/api/tasks"), plain("GET", "/api/tasks")),
        (
            &s.app,
            ("GET", "/api/tasks"),
            plain("GET", "/api/tasks?limit=0"),
        ),
        (&keyed, ("GET", "/api/tasks"), plain("GET", "/api/tasks")),
        (
            &s.app,
            ("GET", "/api/tasks"),
            plain("GET", "/api/tasks?limit=1&limit=2"),
        ),
        (
            &s.app,
            ("GET", "/api/tasks/summary"),
            plain("GET", "/api/tasks/summary"),
        ),
        (
            &keyed,
            ("GET", "/api/tasks/summary"),
            plain("GET", "/api/tasks/summary"),
        ),
        (&s.app, ("GET", "/health"), plain("GET", "/health")),
        (&s.app, ("GET", "/ready"), plain("GET", "/ready")),
        (&s.app, ("GET", "/metrics"), plain("GET", "/metrics")),
        (
            &s.app,
            ("GET", "/openapi.json"),
            plain("GET", "/openapi.json"),
        ),
        (&s.app, ("GET", "/"), plain("GET", "/")),
    ];
    let mut seen: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
    for (app, (method, path), request) in cases {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let key = (method.to_string(), path.to_string());
        assert!(
            operations[&key].contains(&status),
            "{method} {path} answered {status}, which its documentation lacks ({:?})",
            operations[&key]
        );
        seen.entry(key).or_default().insert(status);
    }
    // The cases reach the answers that matter to clients (a test of the test).
    let upload_seen = &seen[&("POST".to_string(), "/api/upload-image".to_string())];
    for status in [202, 400, 401, 413, 415, 422, 429, 503] {
        assert!(
            upload_seen.contains(&status),
            "upload answered {status} in the cases: {upload_seen:?}"
        );
    }
}

#[tokio::test]
async fn the_interactive_docs_are_served_from_the_binary_behind_any_path_prefix() {
    let s = service();
    for page in ["/docs", "/docs/"] {
        docs_page_loads(&s.app, page).await;
    }
}

/// `page` is Swagger UI over our document, and every asset it names is served here. Each URL
/// is resolved as a browser would, against the page as a proxy serves it under `/prefix` (it
/// strips the prefix before passing the request on): none may leave the prefix.
async fn docs_page_loads(app: &Router, page: &str) {
    let get = |path: String| async move {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    };
    let (status, html) = get(page.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let html = String::from_utf8(html.to_vec()).unwrap();
    assert!(
        !html.contains("//cdn") && !html.contains("unpkg") && !html.contains("jsdelivr"),
        "no asset comes from outside: {html}"
    );
    let seen_by_browser =
        reqwest::Url::parse(&format!("https://example.com/prefix{page}")).unwrap();
    let mut named = BTreeSet::new();
    for piece in html.split(['"', '\'']) {
        if piece.ends_with(".js") || piece.ends_with(".css") || piece.ends_with(".json") {
            let url = seen_by_browser.join(piece).unwrap();
            let path = url.path().strip_prefix("/prefix").unwrap_or_else(|| {
                panic!("{page} names {piece}, which leaves the proxy's prefix: {url}")
            });
            let (status, _) = get(path.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{page} names {piece}: {path}");
            named.insert(path.to_string());
        }
    }
    for path in [
        "/openapi.json",
        "/docs/swagger-ui.css",
        "/docs/swagger-ui-bundle.js",
    ] {
        assert!(named.contains(path), "{page} loads {path}: {html}");
    }
}
