//! Authentication, tenants, limits and TLS, end to end: a real coordinator process with tokens (and TLS),
//! every RPC called as each kind of caller.

use std::time::Duration;

use stylefarm_proto::connect::{AuthChannel, Credentials};
use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;
use stylefarm_proto::pb::worker_service_client::WorkerServiceClient;
use stylefarm_tests::{
    logged_addr, metric_value, metrics_addr, path, scrape, submit, tubingen_x_starry, wait_for,
    wait_registered, x_starry, Cluster,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const WORKER: &str = "worker-token-0123456789";

/// A channel to `url` presenting `credentials`.
async fn channel(url: &str, credentials: &Credentials) -> Result<AuthChannel, String> {
    channel_from(url, credentials, None).await
}

/// A channel to `url` presenting `credentials`, from the local address `from` (any of 127.0.0.0/8 for a
/// coordinator on the loopback: another source address on this machine).
async fn channel_from(
    url: &str,
    credentials: &Credentials,
    from: Option<std::net::IpAddr>,
) -> Result<AuthChannel, String> {
    let endpoint = credentials
        .endpoint(url)
        .map_err(|e| e.to_string())?
        .local_address(from);
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    credentials.authorize(channel).map_err(|e| e.to_string())
}

/// ListJobs over `c`, within 10 s: the call's error otherwise.
async fn list_within_10_s(c: AuthChannel) -> Result<(), String> {
    let mut rpc = RenderServiceClient::new(c);
    tokio::time::timeout(
        Duration::from_secs(10),
        rpc.list_jobs(pb::ListJobsRequest::default()),
    )
    .await
    .map_err(|_| "no answer in 10 s".to_string())?
    .map(|_| ())
    .map_err(|s| format!("{s:?}"))
}

fn token(t: Option<&str>) -> Credentials {
    Credentials {
        token: t.map(String::from),
        ..Default::default()
    }
}

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 128]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn upload_parts(bytes: &[u8]) -> Vec<pb::UploadImageRequest> {
    vec![pb::UploadImageRequest {
        part: Some(pb::upload_image_request::Part::Data(bytes.to_vec())),
    }]
}

/// The code of a call's outcome: `Code::Ok` for a success.
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

/// Each RenderService RPC as `caller`, on alice's job `job` and image `image`: (rpc, code).
async fn render_calls(
    url: &str,
    caller: Option<&str>,
    job: &str,
    image: &str,
    spec: &pb::JobSpec,
) -> Vec<(&'static str, Code)> {
    let mut rpc = RenderServiceClient::new(channel(url, &token(caller)).await.unwrap());
    let mut out = Vec::new();
    out.push((
        "UploadImage",
        code(
            rpc.upload_image(tokio_stream::iter(upload_parts(&png())))
                .await,
        ),
    ));
    out.push((
        "FindImages",
        code(
            rpc.find_images(pb::FindImagesRequest {
                sha256: vec![image.into()],
            })
            .await,
        ),
    ));
    out.push((
        "SubmitJob",
        code(
            rpc.submit_job(pb::SubmitJobRequest {
                spec: Some(spec.clone()),
                client_request_id: String::new(),
                paused: false,
            })
            .await,
        ),
    ));
    let id = || job.to_string();
    out.push((
        "GetJob",
        code(rpc.get_job(pb::GetJobRequest { job_id: id() }).await),
    ));
    out.push((
        "GetTaskLog",
        code(
            rpc.get_task_log(pb::GetTaskLogRequest {
                job_id: id(),
                index: 0,
            })
            .await,
        ),
    ));
    // listing succeeds for every client, but shows only its own jobs: alice's job missing is NOT_FOUND here
    let listed = rpc
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs.iter().any(|j| j.job_id == job));
    out.push((
        "ListJobs",
        match listed {
            Ok(true) => Code::Ok,
            Ok(false) => Code::NotFound,
            Err(s) => s.code(),
        },
    ));
    let watched = match rpc
        .watch_job(pb::WatchJobRequest {
            job_id: id(),
            previews: true,
        })
        .await
    {
        Ok(stream) => code(stream.into_inner().next().await.unwrap()),
        Err(s) => s.code(),
    };
    out.push(("WatchJob", watched));
    let downloaded = match rpc
        .download_result(pb::DownloadRequest {
            sha256: image.into(),
        })
        .await
    {
        Ok(stream) => code(stream.into_inner().next().await.unwrap()),
        Err(s) => s.code(),
    };
    out.push(("DownloadResult", downloaded));
    // pausing and resuming leave it queued
    out.push((
        "PauseJob",
        code(rpc.pause_job(pb::PauseJobRequest { job_id: id() }).await),
    ));
    out.push((
        "ResumeJob",
        code(rpc.resume_job(pb::ResumeJobRequest { job_id: id() }).await),
    ));
    out.push((
        "SetJobPriority",
        code(
            rpc.set_job_priority(pb::SetJobPriorityRequest {
                job_id: id(),
                priority: 1,
            })
            .await,
        ),
    ));
    // alice's job is queued: running it again leaves it so
    out.push((
        "RetryJob",
        code(
            rpc.retry_job(pb::RetryJobRequest {
                job_id: id(),
                tasks: Vec::new(),
            })
            .await,
        ),
    ));
    // last: they end the job for good, then forget it
    out.push((
        "CancelJob",
        code(
            rpc.cancel_job(pb::CancelJobRequest {
                job_id: id(),
                tasks: Vec::new(),
            })
            .await,
        ),
    ));
    out.push((
        "DeleteJob",
        code(rpc.delete_job(pb::DeleteJobRequest { job_id: id() }).await),
    ));
    // the workers are the farm's: any client lists them (a task is named for its job's client only)
    out.push((
        "ListWorkers",
        code(rpc.list_workers(pb::ListWorkersRequest {}).await),
    ));
    // the farm's operator only; past the gate, no worker of that name has called: NOT_FOUND
    let drain = pb::DrainWorkersRequest {
        workers: vec!["nobody".into()],
        undrain: false,
    };
    out.push(("DrainWorkers", code(rpc.drain_workers(drain).await)));
    out
}

/// The methods of stylefarm.v1's service `name`, as its file descriptor set lists them, sorted.
fn service_methods(name: &str) -> Vec<&'static str> {
    use prost::Message;
    static SET: std::sync::OnceLock<prost_types::FileDescriptorSet> = std::sync::OnceLock::new();
    let set = SET.get_or_init(|| {
        prost_types::FileDescriptorSet::decode(stylefarm_proto::FILE_DESCRIPTOR_SET).unwrap()
    });
    let mut methods: Vec<&'static str> = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == name)
        .flat_map(|s| &s.method)
        .map(|m| m.name())
        .collect();
    methods.sort_unstable();
    methods
}

/// Each WorkerService RPC as `caller`: (rpc, code).
async fn worker_calls(url: &str, caller: Option<&str>, image: &str) -> Vec<(&'static str, Code)> {
    let mut rpc = WorkerServiceClient::new(channel(url, &token(caller)).await.unwrap());
    let mut out = Vec::new();
    let registered = rpc
        .register_worker(pb::RegisterWorkerRequest {
            name: "matrix".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            version: "test".into(),
            tags: Vec::new(),
            protocol: stylefarm_proto::PROTOCOL,
            instance: 0,
        })
        .await;
    out.push((
        "RegisterWorker",
        code(registered.as_ref().map(|_| ()).map_err(Clone::clone)),
    ));
    let worker_id = registered.map_or_else(|_| "matrix#0".into(), |r| r.into_inner().worker_id);
    out.push((
        "LeaseTask",
        code(
            rpc.lease_task(pb::LeaseTaskRequest {
                worker_id: worker_id.clone(),
                wait_ms: 0,
                protocol: stylefarm_proto::PROTOCOL,
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "Heartbeat",
        code(
            rpc.heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                ..Default::default()
            })
            .await,
        ),
    ));
    let parts = vec![
        pb::CompleteTaskRequest {
            part: Some(pb::complete_task_request::Part::LeaseId(
                "lease-nope".into(),
            )),
        },
        pb::CompleteTaskRequest {
            part: Some(pb::complete_task_request::Part::Data(png())),
        },
    ];
    out.push((
        "CompleteTask",
        code(rpc.complete_task(tokio_stream::iter(parts)).await),
    ));
    let parts = vec![
        pb::SaveCheckpointRequest {
            part: Some(pb::save_checkpoint_request::Part::LeaseId(
                "lease-nope".into(),
            )),
        },
        pb::SaveCheckpointRequest {
            part: Some(pb::save_checkpoint_request::Part::Data(vec![0; 64])),
        },
    ];
    out.push((
        "SaveCheckpoint",
        code(rpc.save_checkpoint(tokio_stream::iter(parts)).await),
    ));
    out.push((
        "FailTask",
        code(
            rpc.fail_task(pb::FailTaskRequest {
                lease_id: "lease-nope".into(),
                error: "matrix".into(),
                kind: pb::FailureKind::Transient as i32,
                log: None,
            })
            .await,
        ),
    ));
    let downloaded = match rpc
        .download_image(pb::DownloadRequest {
            sha256: image.into(),
        })
        .await
    {
        Ok(stream) => code(stream.into_inner().next().await.unwrap()),
        Err(s) => s.code(),
    };
    out.push(("DownloadImage", downloaded));
    // past the gate, a lease that is no shard's: FAILED_PRECONDITION
    let header = pb::ExchangeRequest {
        part: Some(pb::exchange_request::Part::Header(pb::ExchangeHeader {
            lease_id: "lease-nope".into(),
            call: 0,
        })),
    };
    let exchanged = match rpc.exchange(tokio_stream::iter(vec![header])).await {
        Ok(stream) => match stream.into_inner().next().await {
            Some(reply) => code(reply),
            None => Code::Ok,
        },
        Err(s) => s.code(),
    };
    out.push(("Exchange", exchanged));
    // last: the worker leaves
    out.push((
        "SignOff",
        code(
            rpc.sign_off(pb::SignOffRequest {
                worker_id,
                ..Default::default()
            })
            .await,
        ),
    ));
    out
}

/// The auth matrix: no token, alice's client token (the farm's operator), the worker token, bob's client
/// token (another tenant) x every RPC of both services, against a coordinator started with `--auth-file`
/// (alice), `--client-token` (bob) and `--worker-token`. Printed as a table; each cell checked. Then the same
/// farm end to end: a worker process with its token renders alice's job, submitted with the CLI and her
/// token.
#[tokio::test(flavor = "multi_thread")]
async fn the_auth_matrix_holds_for_every_rpc_and_caller() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    let auth = tempfile::tempdir().unwrap();
    let auth_file = auth.path().join("auth.toml");
    let alice_operator =
        format!("[[client]]\ntenant = \"alice\"\ntoken = \"{ALICE}\"\noperator = true\n");
    std::fs::write(&auth_file, alice_operator).unwrap();
    cluster.coordinator_args = [
        "--auth-file",
        auth_file.to_str().unwrap(),
        "--client-token",
        &format!("bob:{BOB}"),
        "--worker-token",
        WORKER,
    ]
    .map(String::from)
    .to_vec();
    cluster.start_coordinator();
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), ALICE.into())];
    let url = cluster.url.clone();
    // alice's job (no worker yet: it stays queued), and its spec for the others' submits
    let job = submit(&cluster, &tubingen_x_starry(48, 5));
    let mut alice = RenderServiceClient::new(channel(&url, &token(Some(ALICE))).await.unwrap());
    let status = alice
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let spec = status.spec.clone().unwrap();
    let image = spec.contents[0].clone();

    use Code::*;
    let render_expected = |caller: &str| -> [Code; 16] {
        match caller {
            "none" => [Unauthenticated; 16],
            "worker" => [PermissionDenied; 16],
            "alice" => [
                Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, Ok, NotFound,
            ],
            // another tenant: its own uploads and jobs; alice's job is not found, not even listed; images
            // are content-addressed, readable by any client that knows the hash; the workers are listed,
            // not drained (not the operator)
            "bob" => [
                Ok,
                Ok,
                Ok,
                NotFound,
                NotFound,
                NotFound,
                NotFound,
                Ok,
                NotFound,
                NotFound,
                NotFound,
                NotFound,
                NotFound,
                NotFound,
                Ok,
                PermissionDenied,
            ],
            _ => unreachable!(),
        }
    };
    let worker_expected = |caller: &str| -> [Code; 9] {
        match caller {
            "none" => [Unauthenticated; 9],
            "worker" => [Ok, Ok, Ok, Ok, Ok, Ok, Ok, FailedPrecondition, Ok],
            "alice" | "bob" => [PermissionDenied; 9],
            _ => unreachable!(),
        }
    };
    let mut table = String::from("| caller | RPC | code |\n| --- | --- | --- |\n");
    let mut wrong = Vec::new();
    // alice last among the render callers: her CancelJob ends the job, her DeleteJob forgets it
    for (caller, t) in [
        ("none", None),
        ("worker", Some(WORKER)),
        ("bob", Some(BOB)),
        ("alice", Some(ALICE)),
    ] {
        let got = render_calls(&url, t, &job, &image, &spec).await;
        // every method the service has, none left out of the matrix
        let mut called: Vec<&str> = got.iter().map(|(rpc, _)| *rpc).collect();
        called.sort_unstable();
        assert_eq!(called, service_methods("RenderService"), "{caller}");
        let expected = render_expected(caller);
        assert_eq!(
            got.len(),
            expected.len(),
            "{caller}: every RenderService call"
        );
        for ((rpc, code), want) in got.iter().zip(expected) {
            table += &format!("| {caller} | RenderService/{rpc} | {code:?} |\n");
            if *code != want {
                wrong.push(format!("{caller} {rpc}: {code:?}, expected {want:?}"));
            }
        }
    }
    for (caller, t) in [
        ("none", None),
        ("worker", Some(WORKER)),
        ("bob", Some(BOB)),
        ("alice", Some(ALICE)),
    ] {
        let got = worker_calls(&url, t, &image).await;
        let mut called: Vec<&str> = got.iter().map(|(rpc, _)| *rpc).collect();
        called.sort_unstable();
        assert_eq!(called, service_methods("WorkerService"), "{caller}");
        let expected = worker_expected(caller);
        assert_eq!(
            got.len(),
            expected.len(),
            "{caller}: every WorkerService call"
        );
        for ((rpc, code), want) in got.iter().zip(expected) {
            table += &format!("| {caller} | WorkerService/{rpc} | {code:?} |\n");
            if *code != want {
                wrong.push(format!("{caller} {rpc}: {code:?}, expected {want:?}"));
            }
        }
    }
    eprintln!("{table}");
    assert!(wrong.is_empty(), "{wrong:#?}\n{table}");
    // the messages say what is wrong
    let none = RenderServiceClient::new(channel(&url, &token(None)).await.unwrap())
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert!(
        none.message().contains("authorization: missing"),
        "{none:?}"
    );
    let not_operator = RenderServiceClient::new(channel(&url, &token(Some(BOB))).await.unwrap())
        .drain_workers(pb::DrainWorkersRequest {
            workers: vec!["any".into()],
            undrain: false,
        })
        .await
        .unwrap_err();
    assert!(
        not_operator
            .message()
            .contains("DrainWorkers: only an operator's token may"),
        "{not_operator:?}"
    );
    let unknown = RenderServiceClient::new(
        channel(&url, &token(Some("not-a-known-token-at-all")))
            .await
            .unwrap(),
    )
    .list_jobs(pb::ListJobsRequest::default())
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Unauthenticated);
    assert!(unknown.message().contains("unknown token"), "{unknown:?}");

    // request ids are per tenant: bob reusing alice's gets a job of his own
    let mut bob = RenderServiceClient::new(channel(&url, &token(Some(BOB))).await.unwrap());
    let send = |rpc: &mut RenderServiceClient<AuthChannel>, rid: &str| {
        let mut rpc = rpc.clone();
        let request = pb::SubmitJobRequest {
            spec: Some(spec.clone()),
            client_request_id: rid.into(),
            paused: false,
        };
        async move { rpc.submit_job(request).await.map(|r| r.into_inner().job_id) }
    };
    let a = send(&mut alice, "shared-id").await.unwrap();
    let b = send(&mut bob, "shared-id").await.unwrap();
    assert_ne!(a, b);
    assert_eq!(send(&mut alice, "shared-id").await.unwrap(), a);
    // the key with another spec: refused, not answered with her first job
    let other = pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            priority: 7,
            ..spec.clone()
        }),
        client_request_id: "shared-id".into(),
        paused: false,
    };
    let err = alice.submit_job(other).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument
            && err.message().starts_with(&format!(
                "client_request_id: used already for job {a}, whose spec differs"
            )),
        "{err:?}"
    );

    // end to end: the CLI with alice's token, a worker process with the worker token
    cluster.add_worker_with_env("w1", &[("STYLEFARM_TOKEN", WORKER)]);
    wait_registered(&cluster, 1).await;
    let mine = submit(&cluster, &x_starry("chelsea.png", 48, 60));
    let mut client = stylefarm_client::FarmClient::connect_with(&url, &token(Some(ALICE)))
        .await
        .unwrap();
    // the worker busy with alice's task: alice sees the task and its progress, bob only that it is busy
    wait_for(
        "alice's task to be under way",
        Duration::from_secs(60),
        || {
            let mut client = client.clone();
            let mine = mine.clone();
            async move {
                let workers = client.workers().await.unwrap();
                workers
                    .iter()
                    .any(|w| w.job_id == mine && w.task == Some(0) && w.progress > 0.0)
                    .then_some(())
            }
        },
    )
    .await;
    let mut bobs = stylefarm_client::FarmClient::connect_with(&url, &token(Some(BOB)))
        .await
        .unwrap();
    let seen = bobs.workers().await.unwrap();
    let busy: Vec<_> = seen.iter().filter(|w| w.health == "busy").collect();
    assert!(
        busy.len() == 1
            && (busy[0].job_id.as_str(), busy[0].task, busy[0].progress) == ("", None, 0.0),
        "{seen:?}"
    );
    wait_state_as(&mut client, &mine).await;
    let (ok, out, _) = cluster.cli(&["list"]);
    assert!(ok && out.contains(&mine), "{out}");
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), BOB.into())];
    // a flag wins over the environment: --token-file, STYLEFARM_TOKEN beside it
    let alice_file = cluster.dir.path().join("alice.token");
    std::fs::write(&alice_file, format!("{ALICE}\n")).unwrap();
    let (ok, out, err) = cluster.cli(&["list", "--token-file", alice_file.to_str().unwrap()]);
    assert!(ok && out.contains(&mine), "{out} {err}");
    let (ok, out, _) = cluster.cli(&["list"]);
    assert!(
        ok && !out.contains(&mine),
        "bob does not see alice's jobs: {out}"
    );
    let (ok, _, err) = cluster.cli(&["status", &mine]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = cluster.cli(&["delete", &mine]);
    assert!(
        !ok && err.contains("not found"),
        "bob cannot delete it: {err}"
    );
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), ALICE.into())];
    let (ok, out, err) = cluster.cli(&["delete", &mine]);
    assert!(ok && out.contains("deleted"), "{out} {err}");
    let (ok, _, err) = cluster.cli(&["status", &mine]);
    assert!(!ok && err.contains("not found"), "deleted: {err}");
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), BOB.into())];
    // a worker with a client's token is refused and leaves, saying why
    cluster.add_worker_with_env("intruder", &[("STYLEFARM_TOKEN", ALICE)]);
    let intruder = cluster.workers.last_mut().unwrap();
    let exit = stylefarm_tests::wait_for(
        "the refused worker to exit",
        Duration::from_secs(60),
        || {
            let done = intruder.child.try_wait().unwrap();
            async move { done }
        },
    )
    .await;
    assert!(!exit.success());
    assert!(
        intruder.log_text().contains("a client token cannot call"),
        "{}",
        intruder.log_text()
    );
}

/// Text a caller sends that the farm shows to people: a worker's device with a control character (an escape
/// sequence that `stylefarm workers` would print to the operator's terminal) is refused, naming it; a
/// beat of a worker never registered, for no lease, lists no worker; an
/// error that names a value a client sent carries at most 1024 of its characters, its control characters
/// escaped (a 20,000-character job id passed gRPC clients' 16-KiB bound on metadata: the client got a
/// transport error in place of the one naming it).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_text_is_refused_or_shown_escaped_and_bounded() {
    let mut cluster = Cluster::new(10.0, 0.3, "embedded");
    cluster.start_coordinator();
    let mut workers = WorkerServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    let refused = workers
        .register_worker(pb::RegisterWorkerRequest {
            name: "w".into(),
            protocol: stylefarm_proto::PROTOCOL,
            device: "\x1b[2J\x1b[1;31mPWNED".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("device: "), "{refused:?}");
    // a beat for no lease of a worker never registered: no worker listed
    let beat = pb::HeartbeatRequest {
        worker_id: "nobody#1".into(),
        ..Default::default()
    };
    workers.heartbeat(beat).await.unwrap();
    let (ok, out, err) = cluster.cli(&["workers"]);
    assert!(ok && !out.contains("nobody"), "{out} {err}");
    let mut render = RenderServiceClient::connect(cluster.url.clone())
        .await
        .unwrap();
    let long = format!("\x1b[2J{}", "x".repeat(20_000));
    let status = render
        .get_job(pb::GetJobRequest { job_id: long })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with("job \\u{1b}[2Jxxx")
            // "job " + 20,004 characters + " not found", less the 1024 shown
            && message.ends_with("... (18994 more characters)")
            && message.chars().count() < 1100,
        "{message}"
    );
}

/// Waits for `job` to succeed, as the client given.
async fn wait_state_as(client: &mut stylefarm_client::FarmClient, job: &str) {
    let job_id = job.into();
    let status = tokio::time::timeout(Duration::from_secs(120), client.wait(&job_id))
        .await
        .expect("the job finishes within 120 s")
        .unwrap();
    assert_eq!(status.state, pb::JobState::Succeeded as i32, "{status:?}");
}

/// `--max-connections-per-source 2`: with two connections open from 127.0.0.1, a third from it is closed
/// as it comes (its call fails at once, the warning names the flag), while 127.0.0.2 is served; once one
/// of the two closes, 127.0.0.1 is served again.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_past_max_connections_per_source_is_closed_and_other_hosts_are_served() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = [
        "--max-connections",
        "10",
        "--max-connections-per-source",
        "2",
    ]
    .map(String::from)
    .to_vec();
    cluster.start_coordinator();
    let url = cluster.url.clone();
    let from = |ip: &str| {
        let (url, ip) = (url.clone(), ip.parse().unwrap());
        async move {
            match channel_from(&url, &token(None), Some(ip)).await {
                Ok(c) => list_within_10_s(c.clone()).await.map(|()| c),
                Err(e) => Err(e),
            }
        }
    };
    let first = from("127.0.0.1").await.unwrap();
    let second = from("127.0.0.1").await.unwrap();
    let e = from("127.0.0.1")
        .await
        .expect_err("a third connection from one address past --max-connections-per-source 2");
    assert!(!e.contains("no answer"), "it fails at once: {e}");
    let other = from("127.0.0.2").await.expect("another address is served");
    list_within_10_s(second.clone()).await.unwrap();
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(log.contains("--max-connections-per-source 2"), "{log}");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = from("127.0.0.1").await {
        assert!(
            std::time::Instant::now() < deadline,
            "a place freed by a closed connection is not its address's again: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    list_within_10_s(other).await.unwrap();
}

/// `--max-connections 2`: with two connections open, a third is closed as it comes (its call fails
/// within seconds rather than waiting, the coordinator warns naming the flag, and its metrics count two
/// open and the refusal); the two open ones are still served, and once one closes, a new client is served
/// again. A client that connects and sends nothing is closed after 10 s, its place given back.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_past_max_connections_is_closed_and_the_coordinator_keeps_serving() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = ["--max-connections", "2", "--metrics-listen", "127.0.0.1:0"]
        .map(String::from)
        .to_vec();
    cluster.start_coordinator();
    let metrics = metrics_addr(cluster.coordinator.as_ref().unwrap()).await;
    let list = list_within_10_s;
    let first = channel(&cluster.url, &token(None)).await.unwrap();
    let second = channel(&cluster.url, &token(None)).await.unwrap();
    list(first.clone()).await.unwrap();
    list(second.clone()).await.unwrap();
    let third = match channel(&cluster.url, &token(None)).await {
        Ok(c) => list(c).await,
        Err(e) => Err(e),
    };
    let e = third.expect_err("a third connection past --max-connections 2 is not served");
    assert!(!e.contains("no answer"), "it fails at once: {e}");
    list(second.clone()).await.unwrap();
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(log.contains("--max-connections"), "{log}");
    let text = scrape(&metrics).await;
    assert_eq!(
        metric_value(&text, "stylefarm_connections_open"),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "stylefarm_connections_refused_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = match channel(&cluster.url, &token(None)).await {
            Ok(c) => list(c).await,
            Err(e) => Err(e),
        };
        match again {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("a place freed by a closed connection is not served again: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    list(second.clone()).await.unwrap();
    // the places of the closed connections are given back: only `second` is open
    let open = |n: f64| {
        let metrics = metrics.clone();
        async move {
            (metric_value(&scrape(&metrics).await, "stylefarm_connections_open") == Some(n))
                .then_some(())
        }
    };
    wait_for("one connection open", Duration::from_secs(10), || open(1.0)).await;
    // a client that connects and sends nothing holds its place for FIRST_BYTES_TIMEOUT (10 s), no longer
    let mut silent = tokio::net::TcpStream::connect(&cluster.addr).await.unwrap();
    wait_for(
        "the silent connection served",
        Duration::from_secs(10),
        || open(2.0),
    )
    .await;
    let started = std::time::Instant::now();
    // (the coordinator's own HTTP/2 settings come first; then the end of the stream)
    let mut received = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "closed by the coordinator within 30 s");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    wait_for("its place given back", Duration::from_secs(10), || {
        open(1.0)
    })
    .await;
    list(second).await.unwrap();
}

/// A tenant share the coordinator cannot read (`--tenant-share`, TENANT=SHARE) stops it before it serves,
/// with an error naming the flag and the entry.
#[test]
fn a_bad_tenant_share_stops_the_coordinator_naming_it() {
    let data = tempfile::tempdir().unwrap();
    for (share, says) in [
        ("alice=0", "the share must be a whole number from 1 to 1000"),
        ("alice", "expected TENANT=SHARE"),
        ("alice=2,alice=3", "'alice' is given twice"),
    ] {
        // under `timeout`: a coordinator that took the entry would serve until killed
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(stylefarm_tests::binary())
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--tenant-share",
                share,
            ])
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--tenant-share") && err.contains(says),
            "{share}: {err}"
        );
    }
}

/// TLS files the coordinator cannot serve with (a key of another certificate, a file with no PEM
/// certificate as the certificate or the workers' CA), and a data directory that is a file, stop it before
/// it listens, with an error naming the flag and the file (tonic said "tls: transport error" once listening).
#[test]
fn bad_tls_files_or_data_dir_stop_the_coordinator_naming_them() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let image = stylefarm_tests::shared_image("chelsea.png");
    let (cert, key, image) = (
        pki.path("coordinator.pem"),
        pki.path("coordinator.key"),
        image,
    );
    let (worker_key, data_dir) = (pki.path("worker.key"), data.path().to_path_buf());
    // the flags given, the field the error names, the file it names
    type Case<'a> = (
        Vec<(&'a str, &'a std::path::Path)>,
        &'a str,
        &'a std::path::Path,
    );
    let cases: [Case<'_>; 4] = [
        (
            vec![("--tls-cert", &cert), ("--tls-key", &worker_key)],
            "tls_key",
            &worker_key,
        ),
        (
            vec![("--tls-cert", &image), ("--tls-key", &key)],
            "tls_cert",
            &image,
        ),
        (
            vec![
                ("--tls-cert", &cert),
                ("--tls-key", &key),
                ("--tls-client-ca", &image),
            ],
            "tls_client_ca",
            &image,
        ),
        (vec![("--data-dir", &image)], "data_dir", &image),
    ];
    for (flags, says, file) in cases {
        let mut command = std::process::Command::new("timeout");
        command.arg("60").arg(stylefarm_tests::binary()).args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
        ]);
        if !flags.iter().any(|(flag, _)| *flag == "--data-dir") {
            command.arg("--data-dir").arg(&data_dir);
        }
        for (flag, path) in &flags {
            command.arg(flag).arg(path);
        }
        let out = command.output().unwrap();
        let (stdout, err) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !out.status.success()
                && err.contains(says)
                && err.contains(&file.display().to_string())
                && !stdout.contains("listening"),
            "{says}: {stdout} {err}"
        );
    }
}

/// A client's or a worker's TLS files that cannot be used (a file with no PEM certificate as the CA or the
/// certificate, none that webpki parses as the CA, a key of another certificate) are named, flag and file,
/// before anything is sent (tonic said "tls: transport error"). A CA bundle with junk beside the CA is
/// taken, as tonic takes it.
#[test]
fn bad_tls_files_of_a_caller_are_named() {
    let pki = Pki::new();
    let image = stylefarm_tests::shared_image("chelsea.png");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("worker.pem"),
        pki.path("worker.key"),
    );
    let other_key = pki.path("coordinator.key");
    // a PEM block that is not a certificate webpki parses: alone, no CA; beside the CA, passed over
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let (junk_ca, bundle) = (
        pki.dir.path().join("junk.pem"),
        pki.dir.path().join("bundle.pem"),
    );
    std::fs::write(&junk_ca, junk).unwrap();
    std::fs::write(
        &bundle,
        format!("{junk}{}", std::fs::read_to_string(&ca).unwrap()),
    )
    .unwrap();
    // the flags given, the field the error names and what it says
    let named = |flag: &str, path: &std::path::Path, why: &str| {
        format!("{flag}: {}: {why}", path.display())
    };
    let cases = [
        (
            vec![("--tls-ca", &image)],
            named("tls_ca", &image, "no PEM certificate"),
        ),
        (
            vec![("--tls-ca", &junk_ca)],
            named("tls_ca", &junk_ca, "not a CA certificate"),
        ),
        (
            vec![
                ("--tls-ca", &ca),
                ("--tls-cert", &image),
                ("--tls-key", &key),
            ],
            named("tls_cert", &image, "no PEM certificate"),
        ),
        (
            vec![
                ("--tls-ca", &ca),
                ("--tls-cert", &cert),
                ("--tls-key", &image),
            ],
            named("tls_key", &image, "no PEM private key"),
        ),
        (
            vec![
                ("--tls-ca", &ca),
                ("--tls-cert", &cert),
                ("--tls-key", &other_key),
            ],
            named(
                "tls_key",
                &other_key,
                "not the key of --tls-cert's certificate",
            ),
        ),
    ];
    for (flags, says) in cases {
        let mut command = std::process::Command::new("timeout");
        command.arg("60").arg(stylefarm_tests::binary()).args([
            "list",
            "--coordinator",
            "https://127.0.0.1:9",
        ]);
        for (flag, path) in &flags {
            command.arg(flag).arg(path);
        }
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&says),
            "{says}: {err}"
        );
    }
    // the good ones (the CA in a bundle beside junk) get as far as connecting
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(stylefarm_tests::binary())
        .args(["list", "--coordinator", "https://127.0.0.1:9", "--tls-ca"])
        .arg(&bundle)
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

/// `--max-unfinished-jobs 2`: a tenant's third unfinished job is refused with RESOURCE_EXHAUSTED naming the
/// limit; another tenant is not held by it; cancelling a job frees a place. (A `--tenant-share` for a
/// tenant without a token, and a `--leader-lease-secs` beside the embedded store, are warned about at the
/// start.) A message over the size limit
/// is RESOURCE_EXHAUSTED too, naming the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_past_its_unfinished_jobs_limit_is_refused_naming_it() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = [
        "--client-token",
        &format!("alice:{ALICE}"),
        "--client-token",
        &format!("bob:{BOB}"),
        "--max-unfinished-jobs",
        "2",
        "--tenant-share",
        "carol=2",
        "--leader-lease-secs",
        "3",
    ]
    .map(String::from)
    .to_vec();
    cluster.start_coordinator();
    // a share for a tenant no token names is said to apply to no job; a leader lease, to no store
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("--tenant-share names a tenant that no client token has")
            && log.contains("carol"),
        "{log}"
    );
    assert!(
        log.contains(
            "--leader-lease-secs (STYLEFARM_LEADER_LEASE_SECS) is for coordinators sharing"
        ),
        "{log}"
    );
    let args = [
        "submit",
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--size",
        "48",
    ];
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), ALICE.into())];
    for _ in 0..2 {
        let (ok, _, err) = cluster.cli(&args);
        assert!(ok, "{err}");
    }
    let (ok, _, err) = cluster.cli(&args);
    assert!(
        !ok && err.contains("max_unfinished_jobs") && err.contains("ResourceExhausted"),
        "{err}"
    );
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), BOB.into())];
    let (ok, _, err) = cluster.cli(&args);
    assert!(ok, "bob has his own limit: {err}");
    // a message over the size limit (4 MiB): RESOURCE_EXHAUSTED naming the limit in bytes
    let mut rpc =
        RenderServiceClient::new(channel(&cluster.url, &token(Some(ALICE))).await.unwrap());
    let huge = rpc
        .submit_job(pb::SubmitJobRequest {
            spec: None,
            client_request_id: "x".repeat(5 << 20),
            paused: false,
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(huge.message().contains(&(4 << 20).to_string()), "{huge:?}");
    // cancelling one of alice's frees a place
    cluster.cli_env = vec![("STYLEFARM_TOKEN".into(), ALICE.into())];
    let (_, listed, _) = cluster.cli(&["list"]);
    let first = listed.split_whitespace().next().unwrap().to_string();
    let (ok, _, err) = cluster.cli(&["cancel", &first]);
    assert!(ok, "{err}");
    let (ok, _, err) = cluster.cli(&args);
    assert!(ok, "{err}");
}

/// Certificates made for the test: a CA, the coordinator's (for 127.0.0.1), a worker's client certificate,
/// and one from another CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, sans: Vec<String>, usage, name: &str| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        let farm_ca = ca("stylefarm test CA");
        write("ca.pem", farm_ca.pem());
        leaf(
            &farm_ca,
            vec!["127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "coordinator",
        );
        leaf(
            &farm_ca,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            "worker",
        );
        let other_ca = ca("another CA");
        leaf(
            &other_ca,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            "stranger",
        );
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn credentials(&self, identity: Option<&str>) -> Credentials {
        Credentials {
            token: None,
            tls_ca: Some(self.path("ca.pem")),
            tls_identity: identity.map(|n| {
                (
                    self.path(&format!("{n}.pem")),
                    self.path(&format!("{n}.key")),
                )
            }),
        }
    }
}

/// `GET target` over HTTPS (HTTP/1.1), the server's certificate checked against `ca`; the whole response.
async fn https_get(addr: &str, target: &str, ca: &std::path::Path) -> std::io::Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let host = ServerName::try_from(addr.split(':').next().unwrap().to_string()).unwrap();
    let mut tls = connector.connect(host, tcp).await?;
    tls.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    // a server may close without close_notify after the response: what was read is the response
    let _ = tls.read_to_end(&mut out).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The coordinator on TLS with workers' certificates required (`--tls-cert`, `--tls-key`,
/// `--tls-client-ca`, `--require-worker-cert`): a client connects over https without a certificate and
/// is served; a worker without one is refused UNAUTHENTICATED naming the certificate; with a certificate of
/// the farm's CA it registers; one of another CA fails the handshake (a worker process with it leaves,
/// naming its certificate: before, it took the closed connections for a network fault and tried again for
/// ever); plain http to the port fails; the
/// CLI lists jobs over https with `--tls-ca`. The status page is served over HTTPS with the same
/// certificate, and not over plain HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_clients_without_a_certificate_and_workers_only_with_one() {
    let pki = Pki::new();
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    cluster.coordinator_args = vec![
        "--tls-cert".into(),
        pki.path("coordinator.pem").display().to_string(),
        "--tls-key".into(),
        pki.path("coordinator.key").display().to_string(),
        "--tls-client-ca".into(),
        pki.path("ca.pem").display().to_string(),
        "--require-worker-cert".into(),
        "--status-listen".into(),
        "127.0.0.1:0".into(),
    ];
    cluster.start_coordinator();
    let https = cluster.url.replace("http://", "https://");
    // the status page: HTTPS with the coordinator's certificate, no client certificate asked for
    let status = logged_addr(cluster.coordinator.as_ref().unwrap(), "status page").await;
    let page = https_get(&status, "/api/status", &pki.path("ca.pem"))
        .await
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("\"jobs\":[]"), "{page}");
    let plain = async {
        let mut stream = tokio::net::TcpStream::connect(&status).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    }
    .await;
    assert!(
        !plain.is_ok_and(|out| out.starts_with(b"HTTP/1.1 200")),
        "plain HTTP to the status page's TLS port"
    );

    let mut client =
        RenderServiceClient::new(channel(&https, &pki.credentials(None)).await.unwrap());
    client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();

    let register = |credentials: Credentials| {
        let https = https.clone();
        async move {
            let mut rpc = WorkerServiceClient::new(channel(&https, &credentials).await?);
            rpc.register_worker(pb::RegisterWorkerRequest {
                name: "tls".into(),
                device: "cpu".into(),
                memory_bytes: 0,
                version: "test".into(),
                tags: Vec::new(),
                protocol: stylefarm_proto::PROTOCOL,
                instance: 0,
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    };
    let refused = register(pki.credentials(None)).await.unwrap_err();
    assert!(
        refused.starts_with("Unauthenticated") && refused.contains("client certificate"),
        "{refused}"
    );
    register(pki.credentials(Some("worker"))).await.unwrap();
    assert!(
        register(pki.credentials(Some("stranger"))).await.is_err(),
        "another CA's certificate"
    );
    // a worker process with that certificate leaves, saying why, rather than trying again for ever
    let (cert, key, ca) = (
        pki.path("stranger.pem"),
        pki.path("stranger.key"),
        pki.path("ca.pem"),
    );
    let url = std::mem::replace(&mut cluster.url, https.clone());
    cluster.add_worker_with_env(
        "stranger",
        &[
            ("STYLEFARM_TLS_CA", ca.to_str().unwrap()),
            ("STYLEFARM_TLS_CERT", cert.to_str().unwrap()),
            ("STYLEFARM_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    cluster.url = url;
    let stranger = cluster.workers.last_mut().unwrap();
    let exit = stylefarm_tests::wait_exit(
        &mut stranger.child,
        Duration::from_secs(30),
        "a worker whose certificate is refused exits",
    );
    let log = stranger.log_text();
    assert!(
        exit.code() == Some(1) && log.contains("certificate"),
        "{exit:?}: {log}"
    );

    let plain = RenderServiceClient::new(channel(&cluster.url, &token(None)).await.unwrap())
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert!(plain.is_err(), "plain HTTP/2 to a TLS port");

    let (ok, _, err) = cluster.cli(&[
        "list",
        "--coordinator",
        &https,
        "--tls-ca",
        &pki.path("ca.pem").display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cluster.cli(&["list", "--coordinator", &https]);
    assert!(!ok && err.contains("tls_ca"), "{err}");
}
