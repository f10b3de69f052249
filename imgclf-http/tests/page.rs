//! The page at `/` in a real browser: headless Chromium, driven over the W3C WebDriver protocol
//! through chromedriver, against the real server (in this process, on a socket) with the real
//! model. Real photos go in through the file input; what the page shows must match the
//! reference classification. Needs `IMGCLF_TEST_CHROMEDRIVER` (scripts/services.sh sets it and
//! scripts/setup-chromium.sh installs Chromium); skipped without it, except under CI.
//!
//! Screenshots are left in `$CARGO_TARGET_DIR/test-artifacts/` (`target/test-artifacts/` without
//! it); `docs/page.png` in the README is a copy of `page-desktop.png`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgclf::classifier;
use imgclf::notify::NoopNotifier;
use imgclf::queue::MemoryQueue;
use imgclf::results::MemoryResults;
use imgclf::storage::MemoryStorage;
use imgclf::{ModelSpec, Pipeline, PipelineConfig, Ports};
use imgclf_http::{router, serve, AppState, DEFAULT_HEADER_TIMEOUT};
use imgclf_test_support::{default_model_dir, reference, service_url, shared_dir};
use reqwest::Method;
use serde_json::{json, Value};

/// The server requires this key, so the page's API-key flow is part of the test.
const API_KEY: &str = "page-test-key";

/// Photos the reference model is sure about (top-1 above 80 %, far ahead of the second).
const PHOTOS: [&str; 2] = ["opencv_baboon.jpg", "skimage_coffee.png"];

/// WebDriver's name for an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

const ENTER: &str = "\u{E007}";
const TAB: &str = "\u{E004}";

/// The embedded service on 127.0.0.1:0; stops when dropped.
struct Server {
    base: String,
    _stop_server: tokio::sync::oneshot::Sender<()>,
    _stop_worker: tokio::sync::watch::Sender<bool>,
}

async fn start_server() -> Server {
    let spec = ModelSpec::load(default_model_dir()).expect("model");
    let model = classifier::spawn("tract", spec, &Default::default(), Some(4)).expect("tract");
    let ports = Ports {
        storage: Arc::new(MemoryStorage::new()),
        queue: Arc::new(MemoryQueue::default()),
        results: Arc::new(MemoryResults::new()),
        notifier: Arc::new(NoopNotifier),
    };
    let config = PipelineConfig::default();
    let pipeline = Arc::new(Pipeline::new(ports, model, config));
    let (stop_worker, worker_stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(pipeline.clone().run_worker(worker_stopped));
    let state = AppState::embedded(&pipeline, 8 << 20).with_api_keys(&[API_KEY.to_string()]);
    // Longer than the page's long poll (`wait=30`), as in production.
    let app = router(state, Duration::from_secs(35));
    // Also under a path prefix, as a reverse proxy that strips it would serve it.
    let app = axum::Router::new()
        .nest_service("/imgclf", app.clone())
        .fallback_service(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, DEFAULT_HEADER_TIMEOUT, async move {
        let _ = server_stopped.await;
    }));
    Server {
        base,
        _stop_server: stop_server,
        _stop_worker: stop_worker,
    }
}

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_driver(http: &reqwest::Client, binary: &str) -> Driver {
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = http.get(format!("{}/status", driver.url)).send().await;
        if let Ok(response) = status {
            let body: Value = response.json().await.unwrap_or_default();
            if body["value"]["ready"] == true {
                return driver;
            }
        }
        assert!(Instant::now() < deadline, "{binary} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn open(http: &reqwest::Client, driver: &Driver, width: u32, height: u32) -> Self {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                // Containers give /dev/shm a few MiB; Chromium would crash on it.
                "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ]},
        }}});
        let response = http
            .post(format!("{}/session", driver.url))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON from chromedriver");
        let id = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session ({status}): {body}"));
        Self {
            http: http.clone(),
            session: format!("{}/session/{id}", driver.url),
        }
    }

    /// A WebDriver command; panics with the driver's message if it fails.
    async fn command(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON from chromedriver");
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status}: {} {}",
            body["value"]["error"],
            body["value"]["message"]
        );
        body["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn script(&self, script: &str, args: Value) -> Value {
        let body = json!({ "script": script, "args": args });
        self.command(Method::POST, "/execute/sync", Some(body))
            .await
    }

    async fn find(&self, css: &str) -> String {
        let body = json!({"using": "css selector", "value": css});
        let found = self.command(Method::POST, "/element", Some(body)).await;
        element_id(&found)
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        let body = json!({"using": "css selector", "value": css});
        let found = self.command(Method::POST, "/elements", Some(body)).await;
        found.as_array().unwrap().iter().map(element_id).collect()
    }

    /// The first match of `css` inside `parent`.
    async fn find_in(&self, parent: &str, css: &str) -> String {
        let body = json!({"using": "css selector", "value": css});
        let path = format!("/element/{parent}/element");
        element_id(&self.command(Method::POST, &path, Some(body)).await)
    }

    async fn text(&self, element: &str) -> String {
        let path = format!("/element/{element}/text");
        let text = self.command(Method::GET, &path, None).await;
        text.as_str().unwrap().to_string()
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        let path = format!("/element/{element}/click");
        self.command(Method::POST, &path, Some(json!({}))).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        let path = format!("/element/{element}/value");
        self.command(Method::POST, &path, Some(json!({ "text": text })))
            .await;
    }

    /// Presses a key on whatever has the focus, as a user would.
    async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key},
            {"type": "keyUp", "value": key},
        ]}]});
        self.command(Method::POST, "/actions", Some(actions)).await;
    }

    async fn resize(&self, width: u32, height: u32) {
        let rect = json!({ "width": width, "height": height });
        self.command(Method::POST, "/window/rect", Some(rect)).await;
    }

    /// Runs `script` until it returns something other than null or false; a script that
    /// throws (it does when the page shows a failure) fails the test at once.
    async fn wait_for(&self, what: &str, limit: Duration, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.script(script, args.clone()).await;
            if !(value.is_null() || value == false) {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self.command(Method::GET, "/screenshot", None).await;
        let png = base64_decode(encoded.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }

    async fn close(&self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

fn element_id(found: &Value) -> String {
    found[ELEMENT]
        .as_str()
        .unwrap_or_else(|| panic!("not an element: {found}"))
        .to_string()
}

/// An element as a script argument.
fn element_ref(id: &str) -> Value {
    let mut reference = serde_json::Map::new();
    reference.insert(ELEMENT.to_string(), id.into());
    Value::Object(reference)
}

fn artifacts_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("test-artifacts")
}

/// Standard base64 (WebDriver's screenshots), without pulling in a crate for it.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let symbols: Vec<u8> = text.bytes().filter(|c| !b"=\r\n".contains(c)).collect();
    let mut out = Vec::with_capacity(symbols.len() * 3 / 4);
    for chunk in symbols.chunks(4) {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (value(c) << (18 - 6 * i)));
        out.extend_from_slice(&bits.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The page and its files are served with their types, the CSP and validators.
async fn check_http(http: &reqwest::Client, base: &str) {
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let csp = header("content-security-policy");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("img-src 'self' blob: data:"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"<body data-max-upload-bytes="8388608">"#),
        "the page carries the upload limit"
    );
    for (path, kind) in [
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/favicon.svg", "image/svg+xml"),
    ] {
        let asset = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        let content_type = asset.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        let etag = asset.headers()["etag"].clone();
        let again = http
            .get(format!("{base}{path}"))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path} revalidates");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_classifies_photos_in_a_real_browser() {
    let Some(chromedriver) = service_url("IMGCLF_TEST_CHROMEDRIVER") else {
        eprintln!(
            "skipped: the page test needs chromedriver and Chromium; scripts/setup-chromium.sh \
             installs them and scripts/services.sh sets IMGCLF_TEST_CHROMEDRIVER"
        );
        return;
    };
    let started = Instant::now();
    let server = start_server().await;
    let http = reqwest::Client::new();
    check_http(&http, &server.base).await;

    let driver = start_driver(&http, &chromedriver).await;
    let browser = Arc::new(Browser::open(&http, &driver, 1280, 900).await);
    // The checks run as a task of their own so that a failing one still closes the browser.
    let outcome = tokio::spawn(drive(browser.clone(), server.base.clone())).await;
    browser.close().await;
    drop(driver);
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
    eprintln!("the page test took {:?}", started.elapsed());
}

async fn drive(browser: Arc<Browser>, base: String) {
    let expected = reference("efficientnet-lite0");
    let long = Duration::from_secs(240); // a debug build on two shared cores
    let short = Duration::from_secs(20);

    browser.goto(&format!("{base}/")).await;
    record_csp_violations(&browser).await;
    // Every upload's Idempotency-Key, as the page sends it.
    browser
        .script(
            "window.uploadKeys = []; const send = window.fetch; \
             window.fetch = (path, options = {}) => { \
               if (String(path).includes('upload-image')) \
                 window.uploadKeys.push(new Headers(options.headers).get('Idempotency-Key')); \
               return send(path, options); };",
            json!([]),
        )
        .await;
    assert_eq!(
        drop_border(&browser).await,
        "dashed",
        "the stylesheet applies"
    );

    // Keyboard only: Tab reaches the file input, and the drop zone shows the focus ring.
    let mut focused = Value::Null;
    for _ in 0..10 {
        browser.press(TAB).await;
        focused = browser
            .script("return document.activeElement.id", json!([]))
            .await;
        if focused == "file-input" {
            break;
        }
    }
    assert_eq!(focused, "file-input", "Tab reaches the file input");
    let ring = browser
        .script(
            "const drop = document.getElementById('drop'); \
             return [drop.matches(':focus-within'), getComputedStyle(drop).outlineStyle]",
            json!([]),
        )
        .await;
    assert_eq!(
        ring,
        json!([true, "solid"]),
        "the drop zone shows the focus"
    );

    // Two photos at once, without the key: each card asks for it, and so does the banner.
    let paths: Vec<String> = PHOTOS
        .iter()
        .map(|name| shared_dir().join("images").join(name).display().to_string())
        .collect();
    browser.type_into("#file-input", &paths.join("\n")).await;
    let refused = browser
        .wait_for(
            "both uploads refused without the key",
            short,
            "const cards = [...document.querySelectorAll('#results .card')]; \
             if (cards.length !== 2 || cards.some((c) => c.dataset.state !== 'ERROR')) return null; \
             return { banner: !document.getElementById('auth-banner').hidden, \
                      message: cards[0].querySelector('.msg').textContent };",
            json!([]),
        )
        .await;
    assert_eq!(refused["banner"], true, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("API key"), "{message}");

    // Enter the key and press Enter: the refused uploads go again, and finish.
    browser
        .type_into("#api-key", &format!("{API_KEY}{ENTER}"))
        .await;
    browser
        .wait_for(
            "both photos classified",
            long,
            "const cards = [...document.querySelectorAll('#results .card')]; \
             for (const c of cards) { \
               if (c.dataset.state === 'FAILURE' || c.dataset.state === 'ERROR') \
                 throw new Error(`${c.querySelector('.name').textContent}: ${c.dataset.state}: \
                   ${c.querySelector('.msg').textContent}`); \
             } \
             return cards.length === 2 && cards.every((c) => c.dataset.state === 'SUCCESS');",
            json!([]),
        )
        .await;
    let banner_hidden = browser
        .script(
            "return document.getElementById('auth-banner').hidden",
            json!([]),
        )
        .await;
    assert_eq!(
        banner_hidden, true,
        "the key banner goes once the key works"
    );
    // A card's retry carries its first try's key (no second task for a lost answer), and
    // each card has its own.
    let keys = browser.script("return window.uploadKeys", json!([])).await;
    let keys: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        keys.len(),
        4,
        "two refused uploads and their retries: {keys:?}"
    );
    let distinct: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(distinct.len(), 2, "{keys:?}");
    assert!(distinct.iter().all(|k| k.len() == 32), "{keys:?}");

    // What the page shows, read as text through WebDriver, against the reference.
    let mut task_ids = Vec::new();
    for card in browser.find_all("#results .card").await {
        let name = browser.text(&browser.find_in(&card, ".name").await).await;
        let top = browser
            .text(&browser.find_in(&card, ".pred.top .pred-label").await)
            .await;
        let reference_top = &expected[&name][0].label;
        assert_eq!(&top, reference_top, "top-1 shown for {name}");
        let bars = browser.find_in(&card, ".preds").await;
        let rows = browser
            .script(
                "return [...arguments[0].children].map((li) => \
                   [li.querySelector('.pred-label').textContent, \
                    li.querySelector('.pred-pct').textContent, \
                    li.querySelector('.pred-fill').getBoundingClientRect().width])",
                json!([element_ref(&bars)]),
            )
            .await;
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 5, "top-5 for {name}: {rows:?}");
        let percent = rows[0][1].as_str().unwrap();
        let shown: f32 = percent.trim_end_matches('%').parse().unwrap();
        let probability = expected[&name][0].probability * 100.0;
        assert!(
            (shown - probability).abs() < 2.0,
            "{name}: {percent} against {probability}"
        );
        assert!(rows[0][2].as_f64().unwrap() > rows[4][2].as_f64().unwrap());
        let id = browser
            .script(
                "return arguments[0].dataset.taskId",
                json!([element_ref(&card)]),
            )
            .await;
        task_ids.push((id.as_str().unwrap().to_string(), reference_top.clone()));
    }
    // Without the key field's focus ring: this one is the README's picture.
    browser
        .script("document.activeElement.blur()", json!([]))
        .await;
    browser.screenshot("page-desktop.png").await;

    check_csp_violations(&browser).await;

    // The key survives a reload (localStorage).
    browser.goto(&format!("{base}/")).await;
    record_csp_violations(&browser).await;
    let kept = browser
        .script("return document.getElementById('api-key').value", json!([]))
        .await;
    assert_eq!(kept, API_KEY);

    // The monitor lists both tasks, with their result, and counts them.
    browser.click("#tab-monitor").await;
    let selected = browser
        .script(
            "return [document.getElementById('tab-monitor').getAttribute('aria-selected'), \
                     document.getElementById('panel-monitor').hidden]",
            json!([]),
        )
        .await;
    assert_eq!(selected, json!(["true", false]));
    for (id, label) in &task_ids {
        let row = browser
            .wait_for(
                &format!("task {id} in the monitor"),
                short,
                "const error = document.getElementById('monitor-error'); \
                 if (!error.hidden) throw new Error(`monitor: ${error.textContent}`); \
                 const row = document.querySelector(`tr[data-task-id=\"${arguments[0]}\"]`); \
                 return row && row.dataset.state === 'SUCCESS' ? row : null;",
                json!([id]),
            )
            .await;
        let row = element_id(&row);
        let top = browser.text(&browser.find_in(&row, ".top1").await).await;
        assert!(top.starts_with(label.as_str()), "{top} for {label}");
    }
    let success = browser
        .wait_for(
            "the success count",
            short,
            "const n = document.getElementById('count-SUCCESS').textContent; \
             return n === '–' ? null : n;",
            json!([]),
        )
        .await;
    assert_eq!(success, "2");

    // Filtered to failures, the list empties; no error.
    browser
        .click("#state-filter option[value=\"FAILURE\"]")
        .await;
    browser
        .wait_for(
            "the FAILURE filter",
            short,
            "return document.querySelectorAll('#task-rows tr').length === 0 && \
                    !document.getElementById('tasks-empty').hidden && \
                    document.getElementById('monitor-error').hidden;",
            json!([]),
        )
        .await;
    browser.click("#state-filter option[value=\"\"]").await;
    browser
        .wait_for(
            "all tasks again",
            short,
            "return document.querySelectorAll('#task-rows tr').length === 2;",
            json!([]),
        )
        .await;
    browser.screenshot("page-monitor.png").await;

    // Phone width: nothing scrolls sideways, on either tab.
    browser.resize(375, 812).await;
    let no_sideways_scroll = "return document.documentElement.scrollWidth <= window.innerWidth \
                              ? true : [document.documentElement.scrollWidth, window.innerWidth]";
    let fits = browser.script(no_sideways_scroll, json!([])).await;
    assert_eq!(fits, true, "the monitor at 375 px scrolls sideways: {fits}");
    browser.screenshot("page-phone-monitor.png").await;
    browser.click("#tab-classify").await;
    browser.type_into("#file-input", &paths[0]).await;
    browser
        .wait_for(
            "the photo classified at phone width",
            long,
            "const card = document.querySelector('#results .card'); \
             return card && card.dataset.state === 'SUCCESS';",
            json!([]),
        )
        .await;
    let fits = browser.script(no_sideways_scroll, json!([])).await;
    assert_eq!(fits, true, "the page at 375 px scrolls sideways: {fits}");
    browser.screenshot("page-phone.png").await;

    // A file over the server's limit (8 MiB here) is refused by the page itself, unsent.
    let large = tempfile::Builder::new().suffix(".jpg").tempfile().unwrap();
    large.as_file().set_len(9 << 20).unwrap();
    browser
        .script(
            "window.uploadsSent = 0; const send = window.fetch; \
             window.fetch = (path, options = {}) => { \
               if (String(path).includes('upload-image')) window.uploadsSent += 1; \
               return send(path, options); };",
            json!([]),
        )
        .await;
    browser
        .type_into("#file-input", &large.path().display().to_string())
        .await;
    let refused = browser
        .wait_for(
            "the large file refused",
            short,
            "const card = document.querySelector('#results .card'); \
             return card && card.dataset.state === 'ERROR' \
               ? [card.querySelector('.msg').textContent, window.uploadsSent] : null;",
            json!([]),
        )
        .await;
    let message = refused[0].as_str().unwrap();
    assert!(message.contains("too large"), "{message}");
    assert!(
        message.contains("9.0") && message.contains("8.0"),
        "{message}"
    );
    assert_eq!(refused[1], 0, "nothing was sent");

    check_csp_violations(&browser).await;

    // Behind a proxy's path prefix the page loads its script and styles, and its relative API
    // paths reach the API.
    browser.goto(&format!("{base}/imgclf/")).await;
    let styled = drop_border(&browser).await;
    assert_eq!(styled, "dashed", "the stylesheet applies under a prefix");
    browser
        .script(
            "window.prefixed = null; \
             fetch('api/tasks/summary', { headers: { Authorization: `Bearer ${arguments[0]}` } }) \
               .then((r) => { window.prefixed = `${r.status} ${new URL(r.url).pathname}`; });",
            json!([API_KEY]),
        )
        .await;
    let answered = browser
        .wait_for(
            "the API under the prefix",
            short,
            "return window.prefixed;",
            json!([]),
        )
        .await;
    assert_eq!(answered, "200 /imgclf/api/tasks/summary");

    // The page's link to the API documentation, which loads Swagger UI and our document there.
    let docs = "document.querySelector('a.docs-link').click()";
    browser.script(docs, json!([])).await;
    let shown = browser
        .wait_for(
            "the API documentation under the prefix",
            short,
            "const title = document.querySelector('.swagger-ui .info .title'); \
             return title ? [location.pathname, title.textContent] : null;",
            json!([]),
        )
        .await;
    assert_eq!(shown[0], "/imgclf/docs");
    let title = shown[1].as_str().unwrap();
    assert!(title.starts_with("imgclf"), "{title}");
}

/// The drop zone's border style: `dashed` once the stylesheet applies.
async fn drop_border(browser: &Browser) -> Value {
    let script = "return getComputedStyle(document.getElementById('drop')).borderTopStyle";
    browser.script(script, json!([])).await
}

/// From now on, whatever the page's CSP blocks is recorded (the page loaded from the server's
/// files alone, which the stylesheet check and the working upload show).
async fn record_csp_violations(browser: &Browser) {
    browser
        .script(
            "window.cspViolations = []; document.addEventListener('securitypolicyviolation', \
             (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));",
            json!([]),
        )
        .await;
}

async fn check_csp_violations(browser: &Browser) {
    let violations = browser
        .script("return window.cspViolations", json!([]))
        .await;
    assert_eq!(violations, json!([]), "the page breaks its own CSP");
}
