//! Scheduler throughput with a FAKE ENGINE (for this load test only): simulated workers that complete each
//! task at once with a 1x1 PNG, over real gRPC, against a real coordinator (in this process, on 127.0.0.1:0,
//! with its persistent redb store in a temporary directory).
//!
//!     cargo bench -p stylefarm-coordinator --bench scheduler_load -- [TASKS] [WORKERS]
//!
//! Defaults: 10,000 tasks (one batch job of 100 contents x 100 styles), 50 workers. Prints completions per
//! second (first lease to last completion) and the median and p99 latency of LeaseTask calls that got a task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stylefarm_coordinator::{Coordinator, CoordinatorConfig, SchedulerConfig};
use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;
use stylefarm_proto::pb::worker_service_client::WorkerServiceClient;

fn tiny_png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(
        1,
        1,
        image::Rgb([(seed % 251) as u8, (seed / 251 % 251) as u8, 7]),
    );
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tasks = args.first().copied().unwrap_or(10_000);
    let workers = args.get(1).copied().unwrap_or(50);
    let side = (tasks as f64).sqrt().ceil() as usize;

    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        data_dir: dir.path().to_path_buf(),
        store: Default::default(),
        blobs: Default::default(),
        keep_unused_blobs: None,
        scheduler: SchedulerConfig::default(),
        auth: Default::default(),
        tls: None,
    };
    let coordinator = Coordinator::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(stylefarm_coordinator::serve(
        listener,
        coordinator,
        std::future::pending(),
    ));

    let mut client = loop {
        match RenderServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut hashes = Vec::new();
    for i in 0..2 * side {
        let part = pb::UploadImageRequest {
            part: Some(pb::upload_image_request::Part::Data(tiny_png(i as u32))),
        };
        hashes.push(
            client
                .upload_image(tokio_stream::iter(vec![part]))
                .await
                .unwrap()
                .into_inner()
                .sha256,
        );
    }
    let (contents, styles) = hashes.split_at(side);
    let contents = &contents[..tasks.div_ceil(side)];
    let total = contents.len() * styles.len();
    let spec = pb::JobSpec {
        kind: Some(pb::job_spec::Kind::Batch(pb::job_spec::Batch {})),
        contents: contents.to_vec(),
        styles: styles.to_vec(),
        params: Some(pb::RenderParams {
            size: Some(16),
            iterations: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let job_id = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            client_request_id: String::new(),
            paused: false,
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let result = Arc::new(tiny_png(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let url = url.clone();
        let result = result.clone();
        handles.push(tokio::spawn(async move {
            let mut c = WorkerServiceClient::connect(url).await.unwrap();
            let id = c
                .register_worker(pb::RegisterWorkerRequest {
                    name: format!("fake-{w}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .worker_id;
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                let lease = c
                    .lease_task(pb::LeaseTaskRequest {
                        worker_id: id.clone(),
                        wait_ms: 200,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let lease = lease.into_inner();
                if lease.task.is_none() {
                    return latencies;
                }
                latencies.push(t.elapsed());
                let parts = vec![
                    pb::CompleteTaskRequest {
                        part: Some(pb::complete_task_request::Part::LeaseId(lease.lease_id)),
                    },
                    pb::CompleteTaskRequest {
                        part: Some(pb::complete_task_request::Part::Data(result.to_vec())),
                    },
                ];
                assert!(
                    c.complete_task(tokio_stream::iter(parts))
                        .await
                        .unwrap()
                        .into_inner()
                        .accepted
                );
            }
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await.unwrap());
    }
    let elapsed = started.elapsed();
    let status = client
        .get_job(pb::GetJobRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.state,
        pb::JobState::Succeeded as i32,
        "every task completed"
    );
    latencies.sort();
    // the last 200 ms is each worker's final empty long-poll, not counted in `latencies`
    println!(
        "tasks {total}, workers {workers}: {:.0} completions/s ({:.2} s); LeaseTask latency median {:.2} ms, p99 {:.2} ms",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}
