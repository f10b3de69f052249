//! The dashboard and the alert rules watch metrics the service really exports: the embedded
//! service runs in-process on a socket with the real model, classifies real photos, and its
//! `/metrics` scrape must hold every metric named by a query of deploy/grafana/imgclf.json and
//! an expression of deploy/prometheus/alerts.yml. Also: the request metrics are labelled by
//! route template, never by a task id.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgclf::notify::NoopNotifier;
use imgclf::queue::MemoryQueue;
use imgclf::results::MemoryResults;
use imgclf::storage::MemoryStorage;
use imgclf::{classifier, ModelSpec, Pipeline, PipelineConfig, Ports};
use imgclf_http::{router, AppState};
use imgclf_test_support::{default_model_dir, reference_images};
use serde_json::Value;

/// Series Prometheus makes itself for each target, not found in any scrape.
const SYNTHETIC: &[&str] = &["up"];

/// PromQL words that are not metric names: operators, aggregations followed by `by`/`without`,
/// and the keywords taking a label list.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the bracket closing the one at `open` (quotes respected).
fn skip_group(chars: &[char], open: usize) -> usize {
    let (start, end) = (chars[open], matching(chars[open]));
    let mut depth = 0;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            q @ ('"' | '\'' | '`') => i = skip_string(chars, i, q) - 1,
            c if c == start => depth += 1,
            c if c == end => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    chars.len()
}

fn matching(open: char) -> char {
    match open {
        '{' => '}',
        '[' => ']',
        _ => ')',
    }
}

/// Index just past the string opened by `quote` at `at`.
fn skip_string(chars: &[char], at: usize, quote: char) -> usize {
    let mut i = at + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// The metric names a PromQL expression selects: identifiers that are not functions (followed
/// by `(`), keywords, label names (in `{…}` or after `by`, `on`, …), durations or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i, c);
        } else if c == '{' || c == '[' || (c == '(' && label_list_next) {
            label_list_next = false;
            i = skip_group(&chars, i);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers, exponents included (1e-3), and durations (5m).
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || (matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if LABEL_LISTS.contains(&word.as_str()) {
                label_list_next = true;
            } else if !KEYWORDS.contains(&word.as_str()) && next != Some(&'(') {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every query of a Grafana dashboard: panel targets' `expr` (rows' nested panels too) and the
/// metric of each `label_values(metric, label)` variable.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    ("query" | "definition", Value::String(query)) => {
                        if let Some(inner) = query.trim().strip_prefix("label_values(") {
                            let metric = inner.rsplit_once(',').map_or(inner, |(m, _)| m);
                            out.push(metric.to_string());
                        }
                    }
                    _ => dashboard_queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// Every `expr` of a Prometheus rule file.
fn rule_expressions(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules"))
        .map(|rule| rule["expr"].as_str().expect("expr").to_string())
        .collect()
}

/// Names a scrape exports: each sample's, and each histogram's own name beside its
/// `_bucket`, `_sum` and `_count` series.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            if let Some(name) = typed.strip_suffix(" histogram") {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn repository_file(path: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(path)
}

#[test]
fn metric_names_skip_functions_labels_and_durations() {
    let expr = r#"histogram_quantile(0.95, sum by (le, stage) (rate(image_stage_seconds_bucket{job=~"$job", stage!="x"}[$__rate_interval])))
        / on() group_left max without (instance) (image_queue_depth offset 5m) > 1e-3
        and on() (sum(increase(webhook_failure_total[10m])) or vector(0)) == bool 0"#;
    let expected = [
        "image_queue_depth",
        "image_stage_seconds_bucket",
        "webhook_failure_total",
    ];
    assert_eq!(
        metric_names(expr),
        BTreeSet::from(expected.map(String::from))
    );
}

#[tokio::test]
async fn every_dashboard_and_alert_metric_is_exported() {
    // The embedded service: in-memory backends, the real model, served on a socket.
    let spec = ModelSpec::load(default_model_dir()).expect("model");
    let handle = classifier::spawn("tract", spec, &Default::default(), Some(4)).expect("tract");
    let ports = Ports {
        storage: Arc::new(MemoryStorage::new()),
        queue: Arc::new(MemoryQueue::default()),
        results: Arc::new(MemoryResults::new()),
        notifier: Arc::new(NoopNotifier),
    };
    let config = PipelineConfig::default();
    let pipeline = Arc::new(Pipeline::new(ports, handle, config));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline.clone().run_worker(stopped));
    let app = router(
        AppState::embedded(&pipeline, 20 * 1024 * 1024),
        Duration::from_secs(60),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shut, shutdown) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(imgclf_http::serve(
        listener,
        app,
        Duration::from_secs(10),
        async {
            let _ = shutdown.await;
        },
    ));
    let client = reqwest::Client::new();

    // A few real photos, uploaded and waited for with ?wait=.
    let mut ids = Vec::new();
    for (name, label, bytes) in reference_images().into_iter().take(3) {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name.clone()),
        );
        let response = client
            .post(format!("{base}/api/upload-image"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{name}");
        let id = response.json::<Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_string();
        ids.push((id, name, label));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for (id, name, label) in &ids {
        loop {
            let status: Value = client
                .get(format!("{base}/api/task-status/{id}?wait=30"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status["state"] == "SUCCESS" {
                assert_eq!(
                    status["result"]["classification"][0]["label"],
                    label.as_str(),
                    "{name}"
                );
                break;
            }
            assert_ne!(status["state"], "FAILURE", "{name}: {status}");
            assert!(Instant::now() < deadline, "{name} did not finish: {status}");
        }
    }
    // A path no route matches.
    let missing = client
        .get(format!("{base}/no/such/path"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let scrape = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported = exported_names(&scrape);

    // Request metrics: the route template and the status, never the path with its task id.
    let series = |prefix: &str| scrape.lines().filter(|l| l.starts_with(prefix)).count();
    assert!(
        series(
            r#"imgclf_http_requests_total{method="GET",route="/api/task-status/{task_id}",status="200"}"#
        ) == 1,
        "{scrape}"
    );
    assert_eq!(
        series(
            r#"imgclf_http_requests_total{method="POST",route="/api/upload-image",status="202"} 3"#
        ),
        1,
        "{scrape}"
    );
    assert_eq!(
        series(r#"imgclf_http_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        1,
        "{scrape}"
    );
    for (id, _, _) in &ids {
        assert!(
            !scrape.contains(id.as_str()),
            "task id {id} in a label:\n{scrape}"
        );
    }
    assert!(
        scrape.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "imgclf_build_info without the version:\n{scrape}"
    );
    #[cfg(target_os = "linux")]
    assert!(
        exported.contains("process_resident_memory_bytes"),
        "{scrape}"
    );

    // Every metric the dashboard and the alerts name.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repository_file("deploy/grafana/imgclf.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(repository_file("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .expect("the rules are YAML");
    let expressions = rule_expressions(&rules);
    assert!(
        queries.len() >= 10 && expressions.len() >= 5,
        "{queries:?} {expressions:?}"
    );
    let mut missing = Vec::new();
    for (source, query) in queries
        .iter()
        .map(|q| ("dashboard", q))
        .chain(expressions.iter().map(|e| ("alerts.yml", e)))
    {
        let names = metric_names(query);
        assert!(!names.is_empty(), "{source}: no metric found in {query:?}");
        for name in names {
            if !exported.contains(&name) && !SYNTHETIC.contains(&name.as_str()) {
                missing.push(format!("{source}: {name} (in {query})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the scrape:\n{}\n\nscrape:\n{scrape}",
        missing.join("\n")
    );

    let _ = shut.send(());
    server.await.unwrap();
    let _ = stop.send(true);
    worker.await.unwrap();
}
