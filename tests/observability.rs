//! What an operator sees: the Prometheus metrics of a real coordinator and real workers, scraped over HTTP
//! during a job.

use std::time::Duration;

use stylefarm_tests::{
    metric_value as value, metrics_addr, path, scrape, submit, tubingen_x_starry, wait_for,
    wait_iteration, wait_registered, wait_succeeded, Cluster, Node,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A coordinator and workers with `--metrics-listen` (via STYLEFARM_METRICS_LISTEN), a batch of two
/// tasks, its first worker SIGKILLed mid-task and another added: the coordinator's queue, task and job
/// gauges follow the job (one running and one queued, then both succeeded), the lease expiry and the retry
/// are counted, the task durations observed, the blob bytes grow; the worker that finished counts two
/// successes, their engine times, its iterations per second, its memory in use and the bytes it downloaded.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_follow_a_job_and_its_faults() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    cluster.start_coordinator();
    let coordinator = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    let metrics_env = [("STYLEFARM_METRICS_LISTEN", "127.0.0.1:0")];
    cluster.add_worker_with_env("w1", &metrics_env);
    wait_registered(&cluster, 1).await;

    let idle = scrape(&coordinator).await;
    assert_eq!(
        value(&idle, "stylefarm_workers{state=\"live\"}"),
        Some(1.0),
        "{idle}"
    );
    assert_eq!(
        value(&idle, "stylefarm_lease_expiries_total"),
        Some(0.0),
        "{idle}"
    );
    assert_eq!(
        value(&idle, "stylefarm_task_stalls_total"),
        Some(0.0),
        "{idle}"
    );
    assert_eq!(
        value(&idle, "stylefarm_task_seconds_count"),
        Some(0.0),
        "{idle}"
    );
    let blob_bytes_before = value(&idle, "stylefarm_blob_store_bytes").unwrap();

    let id = submit(
        &cluster,
        &[
            "--content",
            &path("tubingen.jpg"),
            "--content",
            &path("chelsea.png"),
            "--style",
            &path("starry_night.jpg"),
            "--batch",
            "--size",
            "48",
            "--iterations",
            "40",
        ],
    );
    wait_iteration(&cluster, &id, 2).await;
    let running = scrape(&coordinator).await;
    assert_eq!(
        value(&running, "stylefarm_tasks{state=\"running\"}"),
        Some(1.0),
        "{running}"
    );
    assert_eq!(
        value(&running, "stylefarm_tasks{state=\"pending\"}"),
        Some(1.0),
        "{running}"
    );
    assert_eq!(
        value(&running, "stylefarm_queue_depth{priority=\"0\"}"),
        Some(1.0),
        "{running}"
    );
    // queued and running, by the job's worker tags (none)
    assert_eq!(
        value(&running, "stylefarm_open_tasks{worker_tags=\"\"}"),
        Some(2.0),
        "{running}"
    );
    assert_eq!(
        value(&running, "stylefarm_jobs{state=\"running\"}"),
        Some(1.0),
        "{running}"
    );
    assert!(value(&running, "stylefarm_blob_store_bytes").unwrap() > blob_bytes_before);

    // the worker dies mid-task: its lease lapses (counted), the task goes back (a retry)
    cluster.workers[0].kill();
    wait_for(
        "the lease expiry to be counted",
        Duration::from_secs(30),
        || async {
            let text = scrape(&coordinator).await;
            (value(&text, "stylefarm_lease_expiries_total") == Some(1.0)).then_some(())
        },
    )
    .await;
    let expired = scrape(&coordinator).await;
    assert_eq!(
        value(&expired, "stylefarm_task_retries_total{kind=\"retryable\"}"),
        Some(1.0),
        "{expired}"
    );
    assert_eq!(
        value(&expired, "stylefarm_queue_depth{priority=\"0\"}"),
        Some(2.0),
        "{expired}"
    );

    cluster.add_worker_with_env("w2", &metrics_env);
    let worker = metrics_addr(&cluster.workers[1]).await;
    wait_succeeded(&cluster, &id).await;
    let done = scrape(&coordinator).await;
    assert_eq!(
        value(&done, "stylefarm_tasks{state=\"succeeded\"}"),
        Some(2.0),
        "{done}"
    );
    // every state is shown, 0 included
    assert_eq!(
        value(&done, "stylefarm_tasks{state=\"running\"}"),
        Some(0.0),
        "{done}"
    );
    assert_eq!(
        value(&done, "stylefarm_jobs{state=\"failed\"}"),
        Some(0.0),
        "{done}"
    );
    assert_eq!(
        value(&done, "stylefarm_jobs{state=\"succeeded\"}"),
        Some(1.0),
        "{done}"
    );
    // the default priority's queue, every reason a task is held and the untagged jobs' open tasks are
    // shown at 0: an autoscaler's query reads 0, not "no data"
    for empty in [
        "stylefarm_queue_depth{priority=\"0\"}",
        "stylefarm_held_tasks{reason=\"paused\"}",
        "stylefarm_held_tasks{reason=\"waiting\"}",
        "stylefarm_held_tasks{reason=\"max_workers\"}",
        "stylefarm_open_tasks{worker_tags=\"\"}",
    ] {
        assert_eq!(value(&done, empty), Some(0.0), "{empty}: {done}");
    }
    assert_eq!(
        value(&done, "stylefarm_task_seconds_count"),
        Some(2.0),
        "{done}"
    );
    assert!(value(&done, "stylefarm_task_seconds_sum").unwrap() > 0.0);
    assert!(
        value(&done, "stylefarm_blob_store_bytes").unwrap()
            > value(&running, "stylefarm_blob_store_bytes").unwrap(),
        "the results are stored"
    );
    assert_eq!(value(&done, "stylefarm_blocklist_events_total"), Some(0.0));
    assert_eq!(value(&done, "stylefarm_job_retries_total"), Some(0.0));

    // the worker counts a task once its report is answered, just after the coordinator took it
    let w = wait_for(
        "the worker to count its tasks",
        Duration::from_secs(30),
        || async {
            let text = scrape(&worker).await;
            (value(&text, "stylefarm_worker_tasks_total{outcome=\"succeeded\"}") == Some(2.0))
                .then_some(text)
        },
    )
    .await;
    assert_eq!(
        value(&w, "stylefarm_worker_tasks_total{outcome=\"succeeded\"}"),
        Some(2.0),
        "{w}"
    );
    assert_eq!(
        value(&w, "stylefarm_worker_task_seconds_count"),
        Some(2.0),
        "{w}"
    );
    assert_eq!(
        value(&w, "stylefarm_worker_engine_seconds_count"),
        Some(2.0),
        "{w}"
    );
    // the engine's wait before its second render (the first has none before it)
    assert_eq!(
        value(&w, "stylefarm_worker_engine_idle_seconds_count"),
        Some(1.0),
        "{w}"
    );
    assert!(
        value(&w, "stylefarm_worker_engine_idle_seconds_sum").unwrap() > 0.0,
        "{w}"
    );
    assert!(
        value(&w, "stylefarm_worker_iterations_per_second").unwrap() > 0.0,
        "{w}"
    );
    assert!(
        value(&w, "stylefarm_worker_device_memory_bytes").unwrap() > f64::from(1 << 20),
        "{w}"
    );
    assert!(
        value(&w, "stylefarm_worker_downloaded_bytes_total").unwrap() > 0.0,
        "{w}"
    );
}

/// `--log-format json` (here STYLEFARM_LOG_FORMAT): the coordinator's and the worker's logs are one JSON
/// object a line, and a task's events carry their span's job_id, task_id and worker_id.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_job_task_and_worker_of_each_event() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_env = vec![("STYLEFARM_LOG_FORMAT".into(), "json".into())];
    cluster.start_coordinator();
    cluster.add_worker_with_env("w1", &[("STYLEFARM_LOG_FORMAT", "json")]);
    let id = submit(&cluster, &tubingen_x_starry(48, 5));
    wait_succeeded(&cluster, &id).await;
    let lines = |node: &Node| -> Vec<serde_json::Value> {
        node.log_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let event = |lines: &[serde_json::Value], message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .cloned()
            .unwrap_or_else(|| panic!("no {message:?} event in {lines:#?}"))
    };
    let worker = lines(&cluster.workers[0]);
    let rendered = event(&worker, "rendered");
    assert_eq!(rendered["span"]["job_id"], id.as_str(), "{rendered:#}");
    assert_eq!(rendered["span"]["task_id"], 0, "{rendered:#}");
    assert!(
        rendered["span"]["worker_id"]
            .as_str()
            .unwrap()
            .starts_with("w1"),
        "{rendered:#}"
    );
    assert!(
        rendered["fields"]["engine_s"].as_f64().unwrap() > 0.0,
        "{rendered:#}"
    );
    let coordinator = lines(cluster.coordinator.as_ref().unwrap());
    let leased = event(&coordinator, "task leased");
    assert_eq!(leased["fields"]["job_id"], id.as_str(), "{leased:#}");
    assert!(
        leased["fields"]["worker_id"]
            .as_str()
            .unwrap()
            .starts_with("w1"),
        "{leased:#}"
    );
}

/// The spans an OTLP/HTTP collector received, each with its service's name.
type Received =
    std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>;

/// A minimal OpenTelemetry collector: OTLP/HTTP protobuf on `POST /v1/traces`, one request a connection;
/// returns its URL and what it received.
async fn otlp_collector() -> (String, Received) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Received::default();
    let spans = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let spans = spans.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                // the head, then the body of Content-Length bytes
                let (head_len, body_len) = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        break (end + 4, len);
                    }
                };
                while buf.len() < head_len + body_len {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let request =
                    ExportTraceServiceRequest::decode(&buf[head_len..head_len + body_len]).unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.lock().unwrap().push((service.clone(), span));
                        }
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    (url, received)
}

/// With an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), the worker exports its task's span (with job_id,
/// task_id, worker_id) and the coordinator its spans of the worker's calls, and the trace context crosses
/// the gRPC hop in the calls' metadata: the coordinator's span of CompleteTask is in the task's trace, a
/// child of a span of the worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_and_the_coordinators_handling_of_it_are_one_trace() {
    let (collector, received) = otlp_collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_env = otel
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cluster.start_coordinator();
    cluster.add_worker_with_env("w1", &otel);
    let id = submit(&cluster, &tubingen_x_starry(48, 5));
    wait_succeeded(&cluster, &id).await;
    // a clean stop flushes the spans still batched
    for node in cluster
        .workers
        .iter_mut()
        .chain(cluster.coordinator.as_mut())
    {
        node.terminate();
        node.child.wait().unwrap();
    }
    let spans = received.lock().unwrap().clone();
    let attribute = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{:?}", v.value))
    };
    let task = spans
        .iter()
        .find(|(service, s)| {
            service.contains("stylefarm-worker")
                && s.name == "task"
                && attribute(s, "job_id").is_some_and(|j| j.contains(&id))
        })
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("no task span of job {id}: {spans:#?}"));
    assert!(
        attribute(&task, "worker_id").is_some_and(|w| w.contains("w1")),
        "{task:?}"
    );
    assert!(attribute(&task, "task_id").is_some(), "{task:?}");
    let worker_spans: Vec<&Vec<u8>> = spans
        .iter()
        .filter(|(service, s)| service.contains("stylefarm-worker") && s.trace_id == task.trace_id)
        .map(|(_, s)| &s.span_id)
        .collect();
    let complete = spans
        .iter()
        .find(|(service, s)| {
            service.contains("stylefarm-coordinator")
                && attribute(s, "method").is_some_and(|m| m.contains("WorkerService/CompleteTask"))
        })
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("no coordinator span of CompleteTask: {spans:#?}"));
    assert_eq!(task.trace_id.len(), 16, "{task:?}");
    assert_eq!(complete.parent_span_id.len(), 8, "{complete:?}");
    assert_eq!(
        complete.trace_id, task.trace_id,
        "one trace across the gRPC hop"
    );
    assert!(
        worker_spans.contains(&&complete.parent_span_id),
        "the coordinator's span is a child of the worker's: {complete:?}"
    );
}

/// One POST a webhook receiver got.
#[derive(Debug, Clone, PartialEq)]
struct Post {
    /// Its `X-Stylefarm-Delivery` header.
    delivery: String,
    /// Its `webhook-id` header (Standard Webhooks).
    id: String,
    body: serde_json::Value,
    /// Standard Webhooks' check of its signature with the receiver's secret: Ok, or why not.
    signed: Result<(), String>,
    /// The same check with [`OLD_SECRET`] passed.
    old_key_passes: bool,
    /// The same check with a secret the coordinator was not given passed.
    other_key_passes: bool,
}

type Posts = std::sync::Arc<std::sync::Mutex<Vec<Post>>>;

/// A Standard Webhooks signing secret (32 bytes, base64) that the coordinator signs with; the one it is
/// being rotated from (24 bytes), which it signs with too; and another.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw+Ow8ZwsNDXs=";
const OLD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OTHER_SECRET: &str = "whsec_ZDq3gbJd5yWZthVhaYPCElPeVzPHLGMWpBdnYjtzWe4=";

/// An HTTP server taking POSTs on `/hooks/s3cr3t`, which answers the first 503 and the others 204,
/// checking each one's signature by [`SECRET`] with Standard Webhooks' library; its URL and what it got.
async fn webhook_receiver() -> (String, Posts) {
    use axum::http::{HeaderMap, StatusCode};
    let posts = Posts::default();
    let got = posts.clone();
    let app = axum::Router::new().route(
        "/hooks/s3cr3t",
        axum::routing::post(
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let check = |secret: &str| {
                    standardwebhooks::Webhook::new(secret)
                        .unwrap()
                        .verify(&body, &headers)
                        .map_err(|e| e.to_string())
                };
                let post = Post {
                    delivery: header("x-stylefarm-delivery"),
                    id: header("webhook-id"),
                    body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                    signed: check(SECRET),
                    old_key_passes: check(OLD_SECRET).is_ok(),
                    other_key_passes: check(OTHER_SECRET).is_ok(),
                };
                let mut got = got.lock().unwrap();
                got.push(post);
                if got.len() == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/s3cr3t", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, posts)
}

/// `coordinator --notify-url`: each job that ends is POSTed as JSON (its id, name, kind, state, error,
/// task counts), with a delivery id, signed by each of `--notify-secret-file`'s secrets (a rotation: the
/// new one and the old) as Standard Webhooks' library checks it; a 503 answer gets the same delivery again. The metrics count the deliveries, and
/// the coordinator's log names the receiver's host, not the URL's secret path nor the signing secret.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_that_end_are_announced_to_the_notify_url() {
    let (url, posts) = webhook_receiver().await;
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    let secret = cluster.dir.path().join("notify-secret");
    // rotating the receiver's secret: the new one and the old, one a line
    std::fs::write(&secret, format!("{SECRET}\n{OLD_SECRET}\n")).unwrap();
    cluster.coordinator_args = [
        "--notify-url",
        &url,
        "--notify-secret-file",
        secret.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    cluster.start_coordinator();
    let coordinator = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    cluster.add_worker("w1");
    let rendered = submit(
        &cluster,
        &[
            &tubingen_x_starry(48, 3)[..],
            &["--name".into(), "poster".into()],
        ]
        .concat(),
    );
    wait_succeeded(&cluster, &rendered).await;
    let held = submit(
        &cluster,
        &[&tubingen_x_starry(48, 3)[..], &["--paused".into()]].concat(),
    );
    let (ok, _, err) = cluster.cli(&["cancel", &held]);
    assert!(ok, "{err}");
    let posts = wait_for("three POSTs", Duration::from_secs(30), || {
        let posts = posts.lock().unwrap().clone();
        async move { (posts.len() >= 3).then_some(posts) }
    })
    .await;
    // each signed with the secret and the old one (and not with another), its webhook-id the delivery id
    for post in &posts {
        assert_eq!(post.signed, Ok(()), "{post:#?}");
        assert!(post.old_key_passes && !post.other_key_passes, "{post:#?}");
        assert_eq!(post.id, post.delivery, "{post:#?}");
    }
    let of = |job: &str| -> Vec<(String, serde_json::Value)> {
        let prefix = format!("{job}@");
        posts
            .iter()
            .filter(|p| p.delivery.starts_with(&prefix))
            .map(|p| (p.delivery.clone(), p.body.clone()))
            .collect()
    };
    // the first answered 503, and sent again as the same delivery
    let done = of(&rendered);
    assert!(done.len() == 2 && done[0] == done[1], "{posts:#?}");
    let done = &done[0].1;
    assert_eq!(done["event"], "job_ended");
    assert_eq!(done["job_id"], rendered.as_str());
    assert_eq!(done["name"], "poster");
    assert_eq!(done["kind"], "single");
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(
        (done["tasks"].as_u64(), done["succeeded"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(done["finished_ms"].as_i64() >= done["submitted_ms"].as_i64());
    let cancelled = of(&held);
    assert_eq!(cancelled.len(), 1, "{posts:#?}");
    let cancelled = &cancelled[0].1;
    assert_eq!(
        (&cancelled["job_id"], &cancelled["state"]),
        (&serde_json::json!(held), &serde_json::json!("cancelled")),
        "{cancelled:#}"
    );
    assert_eq!(cancelled["cancelled"].as_u64(), Some(1), "{cancelled:#}");
    let metrics = wait_for("two deliveries counted", Duration::from_secs(10), || {
        let coordinator = coordinator.clone();
        async move {
            let text = scrape(&coordinator).await;
            (value(
                &text,
                "stylefarm_notifications_total{outcome=\"delivered\"}",
            ) == Some(2.0))
            .then_some(text)
        }
    })
    .await;
    assert_eq!(
        value(
            &metrics,
            "stylefarm_notifications_total{outcome=\"gave_up\"}"
        ),
        None,
        "{metrics}"
    );
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    let announced = log.lines().find(|l| l.contains("job end announced"));
    assert!(
        announced.is_some_and(|l| l.contains("host=\"127.0.0.1\"")),
        "{log}"
    );
    assert!(!log.contains("s3cr3t"), "{log}");
    assert!(!log.contains(&SECRET[6..20]), "{log}");
    assert!(!log.contains(&OLD_SECRET[6..20]), "{log}");
}

/// A job's end whose delivery was under way when its coordinator was killed (the receiver answering 503)
/// is announced by the next coordinator on the store, under the same delivery id; once delivered, it is
/// not announced again by the one after that.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_end_not_announced_when_its_coordinator_died_is_announced_by_the_next() {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    // the receiver: 503 while it is down, 204 once up; each POST's delivery id and answer
    let up = Arc::new(AtomicBool::new(false));
    let posts: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let (receiver_up, got) = (up.clone(), posts.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| async move {
            let code = if receiver_up.load(SeqCst) { 204 } else { 503 };
            let delivery = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            got.lock().unwrap().push((delivery, code));
            StatusCode::from_u16(code).unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = vec!["--notify-url".into(), url];
    cluster.start_coordinator();
    let held = submit(
        &cluster,
        &[&tubingen_x_starry(48, 3)[..], &["--paused".into()]].concat(),
    );
    let (ok, _, err) = cluster.cli(&["cancel", &held]);
    assert!(ok, "{err}");
    let posted = |n: usize| {
        let posts = posts.clone();
        move || {
            let posts = posts.lock().unwrap().clone();
            async move { (posts.len() >= n).then_some(posts) }
        }
    };
    let refused = wait_for("a try answered 503", Duration::from_secs(30), posted(1)).await;
    let delivery = refused[0].0.clone();
    assert!(delivery.starts_with(&format!("{held}@")), "{refused:?}");
    cluster.coordinator.as_mut().unwrap().kill();
    up.store(true, SeqCst);
    let tries = posts.lock().unwrap().len();
    cluster.start_coordinator();
    let after = wait_for(
        "the end delivered",
        Duration::from_secs(30),
        posted(tries + 1),
    )
    .await;
    assert_eq!(after[tries], (delivery.clone(), 204), "{after:?}");
    // delivered and recorded: the next coordinator does not announce it again
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.coordinator.as_mut().unwrap().terminate();
    cluster.start_coordinator();
    let (ok, _, err) = cluster.cli(&["status", &held]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posts = posts.lock().unwrap().clone();
    assert_eq!(posts.len(), tries + 1, "{posts:?}");
}

/// A signing secret that is not one (too short; not whsec_; a file of two lines, where a tool wrapped a key;
/// a file that is not there, or one that never ends), or one without a URL to sign for, is refused at start,
/// naming the flag and not showing the secret.
#[test]
fn a_coordinator_refuses_a_notify_secret_that_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    let (file, wrapped) = (dir.path().join("secret"), dir.path().join("wrapped"));
    std::fs::write(&file, "hunter2hunter2hunter2hunter2\n").unwrap();
    // a 64-byte key's base64 as `base64` writes it: wrapped at 76 characters, its first line a key too
    std::fs::write(
        &wrapped,
        format!("whsec_{}\n{}\n", "QUFB".repeat(19), "QUFBQQ=="),
    )
    .unwrap();
    let short = "whsec_c2hvcnQ=";
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec!["--notify-secret".into(), short.into()],
            "--notify-secret: 5 bytes",
        ),
        (
            vec!["--notify-secret-file".into(), path(&file)],
            "--notify-secret-file: does not start with whsec_",
        ),
        (
            vec!["--notify-secret-file".into(), path(&wrapped)],
            "line 2 does not start with whsec_: give each secret on one line (not wrapped)",
        ),
        (
            vec!["--notify-secret-file".into(), "/nonexistent/secret".into()],
            "--notify-secret-file: /nonexistent/secret:",
        ),
        (
            vec!["--notify-secret-file".into(), "/dev/zero".into()],
            "longer than 1 MiB",
        ),
    ];
    let refused = |args: &[String]| {
        let mut child = stylefarm_tests::stylefarm()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = stylefarm_tests::wait_exit(&mut child, Duration::from_secs(30), "refused");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (status, err)
    };
    for (args, says) in cases {
        let with_url = [
            &["--notify-url".into(), "http://127.0.0.1:9/hook".into()],
            &args[..],
        ]
        .concat();
        let (status, err) = refused(&with_url);
        assert!(!status.success() && err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("hunter2") && !err.contains("c2hvcnQ") && !err.contains("QUFB"),
            "{err}"
        );
    }
    // without --notify-url: the argument parser's refusal
    let (status, err) = refused(&["--notify-secret".into(), short.into()]);
    assert!(
        status.code() == Some(2) && err.contains("--notify-url"),
        "{err}"
    );
}
