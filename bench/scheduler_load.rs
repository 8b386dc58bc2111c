//! Scheduler throughput with a FAKE ENGINE (for this load test only): simulated workers that complete each
//! task at once with a 1x1 PNG, over real gRPC, against a real coordinator (in this process, on 127.0.0.1:0,
//! with its persistent redb store in a temporary directory).
//!
//!     cargo bench -p stylefarm-coordinator --bench scheduler_load -- [TASKS] [WORKERS] [TENANTS]
//!
//! Defaults: 10,000 tasks (one batch job of 100 contents x 100 styles), 50 workers, 1 tenant. Prints
//! completions per second (first lease to last completion) and the median and p99 latency of LeaseTask
//! calls that got a task. With TENANTS > 1, the coordinator has a client token per tenant, each tenant
//! submits a batch of TASKS / TENANTS, one after the other, before the workers start, and each job's last
//! completion is printed: the fair share between tenants at equal priority finishes them together, where
//! a FIFO queue would finish them one after the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stylefarm_coordinator::auth::{AuthConfig, WorkerToken};
use stylefarm_coordinator::{Coordinator, CoordinatorConfig, SchedulerConfig};
use stylefarm_proto::connect::Credentials;
use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;
use stylefarm_proto::pb::worker_service_client::WorkerServiceClient;

/// The jobs' size, in px: their results are `SIZE` x `SIZE`.
const SIZE: u32 = 16;

/// A `side` x `side` PNG of one colour made from `seed`.
fn tiny_png(side: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(
        side,
        side,
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
    let tenants = args.get(2).copied().unwrap_or(1).clamp(1, tasks.max(1));
    let per_tenant = tasks / tenants;
    let side = (per_tenant as f64).sqrt().ceil() as usize;
    // tokens only with several tenants: one tenant runs as before, without auth
    let token = |tenant: usize| format!("tenant-{tenant}-token-0123456789");
    let worker_token = "worker-token-0123456789".to_string();
    let auth = if tenants > 1 {
        AuthConfig {
            clients: (0..tenants)
                .map(|t| AuthConfig::parse_client(&format!("t{t}:{}", token(t))).unwrap())
                .collect(),
            workers: vec![WorkerToken {
                token: Some(worker_token.clone()),
                token_file: None,
            }],
        }
    } else {
        AuthConfig::default()
    };

    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        data_dir: dir.path().to_path_buf(),
        store: Default::default(),
        blobs: Default::default(),
        keep_unused_blobs: None,
        scheduler: SchedulerConfig::default(),
        auth,
        tls: None,
        max_connections: stylefarm_coordinator::connections::DEFAULT_MAX_CONNECTIONS,
        max_connections_per_source: None,
        notify: None,
    };
    let coordinator = Coordinator::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(stylefarm_coordinator::serve(
        listener,
        coordinator,
        std::future::pending(),
    ));

    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let clients: Vec<_> = (0..tenants)
        .map(|t| {
            let token = (tenants > 1).then(|| token(t));
            RenderServiceClient::with_interceptor(channel.clone(), bearer(token))
        })
        .collect();
    let mut hashes = Vec::new();
    for i in 0..2 * side {
        let part = pb::UploadImageRequest {
            part: Some(pb::upload_image_request::Part::Data(tiny_png(1, i as u32))),
        };
        hashes.push(
            clients[0]
                .clone()
                .upload_image(tokio_stream::iter(vec![part]))
                .await
                .unwrap()
                .into_inner()
                .sha256,
        );
    }
    let (contents, styles) = hashes.split_at(side);
    let contents = &contents[..per_tenant.div_ceil(side)];
    let total = contents.len() * styles.len() * tenants;
    let spec = pb::JobSpec {
        kind: Some(pb::job_spec::Kind::Batch(pb::job_spec::Batch {})),
        contents: contents.to_vec(),
        styles: styles.to_vec(),
        params: Some(pb::RenderParams {
            size: Some(SIZE),
            iterations: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut job_ids = Vec::new();
    for client in &clients {
        let job_id = client
            .clone()
            .submit_job(pb::SubmitJobRequest {
                spec: Some(spec.clone()),
                client_request_id: String::new(),
                paused: false,
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        job_ids.push(job_id);
    }

    // what the coordinator takes: the 1 x 1 content at the job's size
    let result = Arc::new(tiny_png(SIZE, 0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let result = result.clone();
        let token = (tenants > 1).then(|| worker_token.clone());
        let mut c = WorkerServiceClient::with_interceptor(channel.clone(), bearer(token));
        handles.push(tokio::spawn(async move {
            let id = c
                .register_worker(pb::RegisterWorkerRequest {
                    name: format!("fake-{w}"),
                    protocol: stylefarm_proto::PROTOCOL,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .worker_id;
            let (mut latencies, mut completions) = (Vec::new(), Vec::new());
            loop {
                let t = Instant::now();
                let lease = c
                    .lease_task(pb::LeaseTaskRequest {
                        worker_id: id.clone(),
                        wait_ms: 200,
                        protocol: stylefarm_proto::PROTOCOL,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let lease = lease.into_inner();
                let Some(task) = lease.task else {
                    return (latencies, completions);
                };
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
                completions.push((task.job_id, Instant::now()));
            }
        }));
    }
    let (mut latencies, mut completions) = (Vec::new(), Vec::new());
    for h in handles {
        let (l, c) = h.await.unwrap();
        latencies.extend(l);
        completions.extend(c);
    }
    let elapsed = started.elapsed();
    for (client, job_id) in clients.iter().zip(&job_ids) {
        let status = client
            .clone()
            .get_job(pb::GetJobRequest {
                job_id: job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.state,
            pb::JobState::Succeeded as i32,
            "every task completed"
        );
    }
    latencies.sort();
    // the last 200 ms is each worker's final empty long-poll, not counted in `latencies`
    println!(
        "tasks {total}, workers {workers}, tenants {tenants}: {:.0} completions/s ({:.2} s); LeaseTask \
         latency median {:.2} ms, p99 {:.2} ms",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
    if tenants > 1 {
        // when each tenant's job had its last task completed, in submission order
        let done: Vec<String> = job_ids
            .iter()
            .map(|job_id| {
                let last = completions
                    .iter()
                    .filter(|(job, _)| job == job_id)
                    .map(|(_, at)| *at)
                    .max()
                    .expect("a completion");
                format!("{:.2} s", (last - started).as_secs_f64())
            })
            .collect();
        println!("jobs done at (submission order): {}", done.join(", "));
    }
}

/// The project's interceptor for `token` (none without one), as the client and the worker send it.
fn bearer(token: Option<String>) -> stylefarm_proto::connect::Bearer {
    Credentials {
        token,
        ..Default::default()
    }
    .bearer()
    .unwrap()
}
