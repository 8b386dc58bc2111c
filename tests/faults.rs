//! The fault suite: the farm's real processes (coordinator, workers, redis-server, an S3 server) broken on
//! purpose, and what must survive. The random faults come from a seeded plan, as in Apache Ballista's chaos
//! tests: `STYLEFARM_FAULT_SEED=<n>` replays a run's plan (the seed is printed, and named by every failed
//! assertion); the processes' timing still varies from run to run, so a plan names when and what to break,
//! not which instruction it hits. Each fault, how it is injected and what is observed: RELIABILITY.md.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stylefarm_coordinator::blobs::S3Server;
use stylefarm_coordinator::store::RedisServer;
use stylefarm_proto::pb;
use stylefarm_tests::{
    batch_x_starry, is, job, path, shared_image, stylefarm, submit, task_log, tubingen_x_starry,
    two_shards_x_starry, wait_for, wait_iteration, wait_job, wait_registered, wait_state,
    wait_succeeded, Cluster,
};
use tonic::Code;

/// The plan's seed when `STYLEFARM_FAULT_SEED` does not give one.
const DEFAULT_SEED: u64 = 20_261_201;

fn seed() -> u64 {
    match std::env::var("STYLEFARM_FAULT_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("STYLEFARM_FAULT_SEED: not a number: {s:?}")),
        Err(_) => DEFAULT_SEED,
    }
}

/// The jobs of the SIGKILL run: 20, of 4 distinct specs (content x seed) repeated, so that each result can
/// be checked against a clean run of its spec.
const JOBS: usize = 20;
/// Workers SIGKILLed during that run (the fault budget), each started again after a random pause.
const KILLS: usize = 6;
/// The coordinator's `--max-attempts` for that run: more than the budget, since each kill costs the task it
/// hits one attempt (a task whose workers keep dying fails once out of attempts: a task that crashes its
/// workers must not go round the farm for ever), and one task may be hit by every kill.
const MAX_ATTEMPTS: usize = KILLS + 2;

fn spec_args(variant: usize) -> Vec<String> {
    let content = ["tubingen.jpg", "chelsea.png"][variant % 2];
    [
        "--content",
        &path(content),
        "--style",
        &path("starry_night.jpg"),
        "--size",
        "32",
        // long enough that the jobs outlast the plan's faults, which land in the first 7 s, on an idle
        // machine too (at 48 px with 25 iterations, they once finished after two of its six kills); at 32 px
        // the whole test took 39 s alone on two cores (at 48 px with 100 iterations, 79 s)
        "--iterations",
        "60",
        "--init",
        "noise",
        "--seed",
        &(1 + variant / 2).to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// SubmitJob as sent on the wire: the job id, or the coordinator's status.
async fn submit_spec(
    client: &stylefarm_client::FarmClient,
    spec: &pb::JobSpec,
    request_id: &str,
) -> Result<String, tonic::Status> {
    let reply = client
        .rpc()
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec.clone()),
            client_request_id: request_id.into(),
            paused: false,
        })
        .await?;
    Ok(reply.into_inner().job_id)
}

fn submit_variant(cluster: &Cluster, variant: usize, request_id: &str) -> String {
    let args = spec_args(variant);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--request-id", request_id]);
    submit(cluster, &args)
}

/// Where the coordinator keeps its state in a fault test.
#[derive(Debug, Clone, Copy)]
enum Backend {
    /// Its data dir: the embedded store (`state.redb`) and images on disk.
    Embedded,
    /// A Redis server (append-only file on) and an S3 server of the test's own.
    RedisS3,
}

/// The servers a [`Backend::RedisS3`] cluster runs on, killed when dropped.
struct Services {
    redis: Option<RedisServer>,
    s3: Option<S3Server>,
}

/// A cluster on `backend`, not started yet (add `coordinator_args`, then start it).
fn cluster_on(backend: Backend, lease_secs: f64, heartbeat_secs: f64) -> (Cluster, Services) {
    match backend {
        Backend::Embedded => (
            Cluster::new(lease_secs, heartbeat_secs, "embedded"),
            Services {
                redis: None,
                s3: None,
            },
        ),
        Backend::RedisS3 => {
            let redis = RedisServer::start_persistent();
            let s3 = S3Server::start();
            let mut cluster = Cluster::new(lease_secs, heartbeat_secs, &redis.url());
            cluster.coordinator_args = vec!["--blobs".into(), "s3://farm/images".into()];
            cluster.coordinator_env = s3.env();
            (
                cluster,
                Services {
                    redis: Some(redis),
                    s3: Some(s3),
                },
            )
        }
    }
}

/// 20 small jobs on three workers while the seeded plan SIGKILLs workers at random moments (6 kills, each
/// worker started again after a random pause): every job succeeds, and each result's pixels (sha256) equal
/// those of a clean run of the same spec afterwards. Starts the cluster's coordinator, configured.
async fn twenty_jobs_under_random_worker_kills(mut cluster: Cluster, label: &str) {
    cluster
        .coordinator_args
        .extend(["--max-attempts".into(), MAX_ATTEMPTS.to_string()]);
    cluster.start_coordinator();
    let seed = seed();
    let mut plan = StdRng::seed_from_u64(seed);
    eprintln!("fault plan ({label}): seed {seed} (STYLEFARM_FAULT_SEED replays it)");
    let names = ["w0", "w1", "w2"];
    // the index in cluster.workers of each name's latest process
    let mut slots = Vec::new();
    for name in names {
        slots.push(cluster.workers.len());
        cluster.add_worker(name);
    }
    wait_registered(&cluster, names.len()).await;
    let jobs: Vec<(usize, String)> = (0..JOBS)
        .map(|i| {
            (
                i % 4,
                submit_variant(&cluster, i % 4, &format!("chaos-{i}")),
            )
        })
        .collect();
    let mut client = cluster.client().await;
    let all_done = |statuses: &[pb::JobStatus]| {
        statuses
            .iter()
            .all(|s| s.state >= pb::JobState::Succeeded as i32)
    };
    let mut kills = Vec::new();
    let started = Instant::now();
    while kills.len() < KILLS {
        let pause = Duration::from_millis(plan.random_range(300..1500));
        let victim = plan.random_range(0..names.len());
        let down_for = Duration::from_millis(plan.random_range(0..1000));
        tokio::time::sleep(pause).await;
        let mut statuses = Vec::new();
        for (_, id) in &jobs {
            statuses.push(job(&mut client, id).await);
        }
        if all_done(&statuses) {
            break;
        }
        cluster.workers[slots[victim]].kill();
        kills.push(format!(
            "{:.1}s: SIGKILL {}, down {} ms",
            started.elapsed().as_secs_f64(),
            names[victim],
            down_for.as_millis()
        ));
        tokio::time::sleep(down_for).await;
        slots[victim] = cluster.workers.len();
        cluster.add_worker(&format!("{}-{}", names[victim], kills.len()));
    }
    eprintln!("faults injected ({label}, seed {seed}): {kills:#?}");
    let mut results = Vec::new();
    for (variant, id) in &jobs {
        let status = wait_state(
            &cluster,
            id,
            pb::JobState::Succeeded,
            Duration::from_secs(300),
        )
        .await;
        results.push((*variant, status));
    }
    assert!(
        kills.len() >= KILLS / 2,
        "seed {seed}: the jobs finished before the plan's faults: {kills:?}"
    );
    let attempts: u32 = results.iter().map(|(_, s)| s.tasks[0].attempts).sum();
    assert!(
        attempts > JOBS as u32,
        "seed {seed}: no kill hit a running task ({attempts} attempts for {JOBS} tasks): {kills:?}"
    );
    // clean runs, one per spec, with no fault
    let mut clean = BTreeMap::new();
    for variant in 0..4 {
        let id = submit_variant(&cluster, variant, &format!("clean-{variant}"));
        let status = wait_succeeded(&cluster, &id).await;
        clean.insert(variant, status.tasks[0].result.clone());
    }
    for (variant, status) in &results {
        assert_eq!(
            status.tasks[0].result, clean[variant],
            "seed {seed}: job {} (spec {variant}, {} attempts) differs from a clean run",
            status.job_id, status.tasks[0].attempts
        );
    }
    eprintln!(
        "{label}: {JOBS} jobs, {} faults, {attempts} attempts, pixels equal to clean runs",
        kills.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_jobs_survive_random_worker_kills_on_the_embedded_store() {
    let (cluster, _services) = cluster_on(Backend::Embedded, 1.5, 0.3);
    twenty_jobs_under_random_worker_kills(cluster, "embedded").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_jobs_survive_random_worker_kills_on_redis_and_s3() {
    let (cluster, _services) = cluster_on(Backend::RedisS3, 1.5, 0.3);
    twenty_jobs_under_random_worker_kills(cluster, "redis+s3").await;
}

/// A worker frozen with SIGSTOP past its lease: the task is leased again and rendered by another worker.
/// Thawed with SIGCONT, the frozen worker learns that its lease is gone (its late result, or its
/// cancellation, is discarded), the job keeps the other worker's result, and the thawed worker renders the
/// next job.
async fn frozen_past_its_lease(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 1.5, 0.3);
    cluster.start_coordinator();
    cluster.add_worker("frozen");
    wait_registered(&cluster, 1).await;
    let job_args = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--size",
        "64",
        "--iterations",
        "40",
    ];
    let id = submit(&cluster, &job_args);
    wait_iteration(&cluster, &id, 3).await;
    cluster.workers[0].signal("STOP");
    cluster.add_worker("other");
    let done = wait_succeeded(&cluster, &id).await;
    assert!(
        done.tasks[0].worker_id.starts_with("other"),
        "{:?}",
        done.tasks[0]
    );
    assert_eq!(done.tasks[0].attempts, 2);
    cluster.workers[0].signal("CONT");
    wait_for(
        "the thawed worker to learn that its lease is gone",
        Duration::from_secs(60),
        || async {
            let log = cluster.workers[0].log_text();
            (log.contains("result discarded")
                || log.contains("cancelled by the coordinator")
                || log.contains("no heartbeat answered for two leases"))
            .then_some(())
        },
    )
    .await;
    let after = job(&mut cluster.client().await, &id).await;
    // (both attempts render the same pixels: the result is the other worker's by its worker too)
    assert_eq!(
        after.tasks[0].result, done.tasks[0].result,
        "the job keeps its result"
    );
    assert!(
        after.tasks[0].worker_id.starts_with("other"),
        "{:?}",
        after.tasks[0]
    );
    assert_eq!(after.state, pb::JobState::Succeeded as i32);
    assert_eq!(after.tasks[0].attempts, 2);
    // the thawed worker is still one of the farm's: with the other one gone, it renders the next job
    cluster.workers[1].kill();
    let next = submit(&cluster, &job_args);
    let next = wait_succeeded(&cluster, &next).await;
    assert!(
        next.tasks[0].worker_id.starts_with("frozen"),
        "{:?}",
        next.tasks[0]
    );
}

/// A worker whose every render fails (a fail point panics each one): its failures are strikes, it is
/// blocklisted for the job after three, and every task completes on the other worker.
async fn failing_every_task(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 3.0, 0.3);
    // more attempts than the blocklist's three strikes, so that the bad worker cannot use them all
    cluster
        .coordinator_args
        .extend(["--max-attempts".into(), "6".into()]);
    cluster.start_coordinator();
    cluster.add_worker_with_env("bad", &[("FAILPOINTS", "engine-render=panic(bad worker)")]);
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &batch_x_starry(48, 10));
    // the bad worker alone first: it fails until it is blocklisted, and the job waits for another
    wait_for(
        "the bad worker's three strikes",
        Duration::from_secs(60),
        || async {
            (cluster.workers[0].log_text().matches("task failed").count() >= 3).then_some(())
        },
    )
    .await;
    cluster.add_worker("good");
    let done = wait_succeeded(&cluster, &id).await;
    for t in &done.tasks {
        assert!(t.worker_id.starts_with("good"), "{t:?}");
    }
    let failures = cluster.workers[0].log_text().matches("task failed").count();
    assert_eq!(
        failures, 3,
        "blocklisted after three strikes: no fourth lease"
    );
    // the first task's log: the bad worker's failed attempts, with its lines (the failure's sent with
    // FailTask), then the good one's
    let attempts = task_log(&cluster, &id, 0);
    let (failed, succeeded) = attempts.split_at(attempts.len() - 1);
    assert!(!failed.is_empty(), "{attempts:#?}");
    for (head, lines) in failed {
        assert!(
            head.contains("\tbad#") && head.contains("\tfailed: ") && head.contains("bad worker"),
            "{head}"
        );
        assert!(
            lines.contains("INFO rendering") && lines.contains("WARN task failed"),
            "{lines}"
        );
    }
    let (head, lines) = &succeeded[0];
    assert!(
        head.contains("\tgood#") && head.ends_with("\tsucceeded"),
        "{head}"
    );
    assert!(lines.contains("INFO rendered"), "{lines}");
    let strikes: Vec<(&String, &u32)> = done.strikes.iter().collect();
    assert!(
        strikes.len() == 1 && strikes[0].0.starts_with("bad") && *strikes[0].1 == 3,
        "{strikes:?}"
    );
}

/// A cluster on the embedded store, started, whose coordinator takes back a task that made no progress
/// for `stall_secs` (`--task-stall-secs`), and its first worker, `hung`, with the fail points
/// `failpoints` and a cancel grace of 2 s (it leaves soon after its engine outlasts a cancel).
fn cluster_with_a_hanging_worker(stall_secs: u32, failpoints: &str) -> (Cluster, Services) {
    let (mut cluster, services) = cluster_on(Backend::Embedded, 5.0, 0.3);
    cluster
        .coordinator_args
        .extend(["--task-stall-secs".into(), stall_secs.to_string()]);
    cluster.start_coordinator();
    cluster.add_worker_with_env(
        "hung",
        &[
            ("FAILPOINTS", failpoints),
            ("STYLEFARM_CANCEL_GRACE_SECS", "2"),
        ],
    );
    (cluster, services)
}

/// Waits, at most `within`, for the coordinator to log that it took back a stalled task.
async fn wait_for_a_stall(cluster: &Cluster, within: Duration) {
    let coordinator = cluster.coordinator.as_ref().unwrap();
    wait_for("the stall", within, || async {
        coordinator
            .log_text()
            .contains("task stalled")
            .then_some(())
    })
    .await;
}

/// Waits, at most 20 s, for the cluster's first worker (the hung one) to leave, with an error; its log.
async fn hung_worker_leaves(cluster: &mut Cluster) -> String {
    let hung = &mut cluster.workers[0];
    let status = wait_for("the hung worker to leave", Duration::from_secs(20), || {
        let exited = hung.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "{status:?}");
    hung.log_text()
}

/// A worker whose engine hangs while its heartbeats go on (a fail point sleeps its first render for a
/// minute): with --task-stall-secs 3 the coordinator takes the task back after 3 s without progress, a
/// strike against that worker, which is told to cancel, and the task renders on another worker. The hung
/// worker's engine ignores the cancel: after its --cancel-grace-secs (2 s) the worker leaves with an error,
/// for its supervisor to start it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_whose_engine_hangs_is_taken_back_and_renders_elsewhere() {
    let (mut cluster, _services) = cluster_with_a_hanging_worker(3, "engine-render=1*sleep(60000)");
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &tubingen_x_starry(48, 5));
    wait_for_a_stall(&cluster, Duration::from_secs(30)).await;
    wait_for(
        "the hung worker told to cancel",
        Duration::from_secs(10),
        || async {
            cluster.workers[0]
                .log_text()
                .contains("cancelled by the coordinator")
                .then_some(())
        },
    )
    .await;
    cluster.add_worker("good");
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let log = hung_worker_leaves(&mut cluster).await;
    assert!(
        log.contains("the engine did not stop within 2 s of its task's cancel"),
        "{log}"
    );
    assert!(
        done.tasks[0].worker_id.starts_with("good"),
        "{:?}",
        done.tasks[0]
    );
    assert_eq!(done.tasks[0].attempts, 2, "{:?}", done.tasks[0]);
    let strikes: Vec<(&String, &u32)> = done.strikes.iter().collect();
    assert!(
        strikes.len() == 1 && strikes[0].0.starts_with("hung") && *strikes[0].1 == 1,
        "{strikes:?}"
    );
}

/// An exact-mode scale's two shards, one of whose engines hangs between two exchange calls (fail point
/// `exchange-call=2*off->1*sleep(60000)`: its third call) while its worker heartbeats: the hung shard stalls
/// (coordinator `--task-stall-secs 20`: a cold worker's first shard must reach its first call within it), a
/// strike against its worker, and its worker leaves once its engine outlasts the cancel's grace; the shard
/// waiting in the exchange for it does not stall, however long it waits, and fails with its group at no
/// attempt. With another worker the job then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_whose_engine_hangs_between_exchange_calls_is_taken_back_not_the_one_waiting() {
    let (mut cluster, _services) =
        cluster_with_a_hanging_worker(20, "exchange-call=2*off->1*sleep(60000)");
    cluster.add_worker("waiting");
    wait_registered(&cluster, 2).await;
    // scale 2's two shards, one on each worker
    let id = submit(&cluster, &two_shards_x_starry("6,4"));
    wait_for_a_stall(&cluster, Duration::from_secs(90)).await;
    hung_worker_leaves(&mut cluster).await;
    cluster.add_worker("good");
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert_eq!(log.matches("task stalled").count(), 1, "{log}");
    let strikes: Vec<(&String, &u32)> = done.strikes.iter().collect();
    assert!(
        strikes.len() == 1 && strikes[0].0.starts_with("hung") && *strikes[0].1 == 1,
        "only the hung shard's worker: {strikes:?}"
    );
}

/// A render with checkpoints (`--checkpoint-every 10`) whose worker is killed (SIGKILL) once it saved one
/// of its second scale starts again from that checkpoint on another worker: it skips the first scale and
/// the second's iterations before the checkpoint, and the task succeeds, its checkpoint dropped.
async fn resumed_from_a_checkpoint(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 2.0, 0.3);
    cluster.start_coordinator();
    cluster.add_worker("doomed");
    wait_registered(&cluster, 1).await;
    // 120 iterations at 64 px, then 60 at 128
    let mut args = tubingen_x_starry(128, 120);
    args.extend(["--scales", "2", "--checkpoint-every", "10"].map(String::from));
    let id = submit(&cluster, &args);
    let client = cluster.client().await;
    let seen = wait_for(
        "a checkpoint of the second scale",
        Duration::from_secs(120),
        || {
            let mut client = client.clone();
            let id = &id;
            async move {
                let s = job(&mut client, id).await;
                s.tasks[0].checkpoint.clone().filter(|c| c.scale == 2)
            }
        },
    )
    .await;
    cluster.workers[0].kill();
    cluster.add_worker("other");
    let done = wait_succeeded(&cluster, &id).await;
    let task = &done.tasks[0];
    assert!(task.worker_id.starts_with("other"), "{task:?}");
    assert_eq!(task.attempts, 2, "{task:?}");
    assert_eq!(task.checkpoint, None, "dropped once the task succeeded");
    // and so is its blob (the one seen, and any after it): no collection is configured here
    let gone = client
        .clone()
        .rpc()
        .download_result(pb::DownloadRequest {
            sha256: seen.sha256.clone(),
        })
        .await;
    let gone = match gone {
        Ok(stream) => stream.into_inner().message().await.map(|_| ()),
        Err(s) => Err(s),
    };
    assert_eq!(gone.unwrap_err().code(), Code::NotFound, "{seen:?}");
    let log = cluster.workers[1].log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming from the task's checkpoint"))
        .unwrap_or_else(|| panic!("the other worker resumed: {log}"));
    let at = |key: &str| -> u32 {
        let value = resumed.split(&format!("{key}=")).nth(1).unwrap();
        value
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(at("scale"), 2, "{resumed}");
    assert!(
        at("iteration") >= seen.iteration && at("iteration").is_multiple_of(10),
        "{resumed}, after {seen:?}"
    );
    assert!(!log.contains("the checkpoint does not fit"), "{log}");
    // the task's log: the killed worker's attempt, with what its heartbeats brought, then the other's
    let attempts = task_log(&cluster, &id, 0);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    let (head, lines) = &attempts[0];
    assert!(
        head.starts_with("attempt 1\tdoomed") && head.ends_with("lease expired (worker lost)"),
        "{head}"
    );
    assert!(
        lines.contains("INFO rendering label=") && lines.contains("INFO checkpoint saved"),
        "{lines}"
    );
    let (head, lines) = &attempts[1];
    assert!(
        head.starts_with("attempt 2\tother") && head.ends_with("succeeded"),
        "{head}"
    );
    for line in [
        "resuming from the task's checkpoint",
        "INFO progress scale=2/2 iteration=60/60",
        "INFO rendered engine_s=",
    ] {
        assert!(lines.contains(line), "{line} in {lines}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_task_resumes_from_its_checkpoint_on_another_worker() {
    resumed_from_a_checkpoint(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_task_resumes_from_its_checkpoint_on_another_worker_on_redis_and_s3() {
    resumed_from_a_checkpoint(Backend::RedisS3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_past_its_lease_is_replaced_and_its_late_result_discarded() {
    frozen_past_its_lease(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_past_its_lease_is_replaced_and_its_late_result_discarded_on_redis_and_s3()
{
    frozen_past_its_lease(Backend::RedisS3).await;
}

/// The coordinator frozen (SIGSTOP: a host that hangs, or one a standby replaced) while a worker renders:
/// once no heartbeat has been answered for two leases, the worker stops the render, which nobody would take
/// (the coordinator has taken the task back, or never knew it), instead of rendering it to its end; its
/// report gives up a call unanswered for a lease. Thawed, the coordinator serves again.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_heartbeats_go_unanswered_stops_its_render() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 2.0, 0.3);
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    // about 0.1 s an iteration here: minutes of render
    let id = submit(&cluster, &tubingen_x_starry(64, 3000));
    wait_iteration(&cluster, &id, 3).await;
    let coordinator = cluster.coordinator.as_ref().unwrap();
    coordinator.signal("STOP");
    let worker = &cluster.workers[0];
    worker
        .wait_logged(
            "no heartbeat answered for two leases: stopping the render",
            Duration::from_secs(20),
        )
        .await;
    // the render stopped at its next iteration, and its report gave up a call unanswered for a lease
    worker
        .wait_logged("task over", Duration::from_secs(60))
        .await;
    coordinator.signal("CONT");
    let (ok, _, err) = cluster.cli(&["cancel", &id]);
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_failing_every_task_is_blocklisted_and_the_job_completes_elsewhere() {
    failing_every_task(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_failing_every_task_is_blocklisted_and_the_job_completes_elsewhere_on_redis_and_s3(
) {
    failing_every_task(Backend::RedisS3).await;
}

/// A heartbeat whose lines are slow to come (a fail point holds each beat that carries lines for 4 s
/// before sending it, longer than a task's render): the task's report waits for them, so that every line
/// comes while the lease is held. Sent after the report, they would be dropped: the report ends the lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_s_lines_still_on_their_way_when_the_task_ends_are_kept() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 12.0, 0.3);
    cluster.start_coordinator();
    cluster.add_worker_with_env(
        "slow",
        &[("FAILPOINTS", "worker-heartbeat-lines=return(4000)")],
    );
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &batch_x_starry(32, 5));
    wait_succeeded(&cluster, &id).await;
    let log = cluster.workers[0].log_text();
    for task in 0..2 {
        let attempts = task_log(&cluster, &id, task);
        assert_eq!(attempts.len(), 1, "{attempts:#?}");
        let (head, lines) = &attempts[0];
        assert!(head.ends_with("\tsucceeded"), "{head}");
        // the first beat's line (held back by the fail point), then those the report brought
        for line in [
            "INFO rendering label=",
            "INFO progress scale=1/1 iteration=5/5",
            "INFO rendered engine_s=",
        ] {
            assert!(
                lines.contains(line),
                "task {task}: {line} in {lines}\nworker: {log}"
            );
        }
    }
}

/// A lease whose answer the worker did not get (fail point `worker-lease-reply-lost=1*return`: the first
/// answer that brings a task is dropped, as a broken connection drops it): the worker connects again and
/// sends the same request (its request_id), and the coordinator hands it the same lease. The task runs
/// once, its first attempt succeeds; before, the lease was held until it expired (12 s here), as a lost
/// worker's, at the cost of an attempt and a strike, and the task ran again.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_whose_answer_was_lost_is_handed_to_its_worker_again() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 12.0, 0.3);
    cluster.start_coordinator();
    cluster.add_worker_with_env(
        "unlucky",
        &[("FAILPOINTS", "worker-lease-reply-lost=1*return")],
    );
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &tubingen_x_starry(32, 5));
    let done = wait_succeeded(&cluster, &id).await;
    let worker = cluster.workers[0].log_text();
    assert!(
        worker.contains("the answer was lost (injected)"),
        "{worker}"
    );
    assert_eq!(done.tasks[0].attempts, 1, "{worker}");
    let attempts = task_log(&cluster, &id, 0);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert!(attempts[0].0.ends_with("\tsucceeded"), "{attempts:#?}");
    let coordinator = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(coordinator.contains("lease handed again"), "{coordinator}");
}

/// Heartbeats answered after the worker stopped waiting (fail point `coordinator-heartbeat=sleep(1000)`,
/// past the 0.3 s a worker waits): their lines came, and the worker sends them again with the next beat and
/// its report; the task's log has each line once.
#[tokio::test(flavor = "multi_thread")]
async fn lines_of_a_heartbeat_that_timed_out_after_it_came_are_kept_once() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 12.0, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-heartbeat=sleep(1000)".into(),
    ));
    cluster.start_coordinator();
    cluster.add_worker("impatient");
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &tubingen_x_starry(32, 20));
    wait_succeeded(&cluster, &id).await;
    let worker = cluster.workers[0].log_text();
    let attempts = task_log(&cluster, &id, 0);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    let (head, lines) = &attempts[0];
    assert!(head.ends_with("\tsucceeded"), "{head}");
    // beats timed out, and their lines were sent again
    assert!(lines.contains("heartbeat timed out"), "{lines}");
    for line in ["INFO rendering label=", "INFO rendered engine_s="] {
        assert_eq!(
            lines.matches(line).count(),
            1,
            "{line} in {lines}\nworker: {worker}"
        );
    }
    // no line twice (each has its time to the microsecond)
    let all: Vec<&str> = lines.lines().collect();
    let unique: std::collections::HashSet<&str> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "{lines}");
}

/// A coordinator that refuses results for longer than the worker's old five tries took (fail point
/// `coordinator-complete-task=6*return`: UNAVAILABLE six times, 17.5 s of backoff), as one whose store is
/// out of reach for a while does: the worker keeps sending its result while its heartbeats keep the lease,
/// and the first attempt's result is taken; the task is not rendered again.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_refused_for_a_while_is_sent_until_it_is_taken() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 3.0, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-complete-task=6*return".into(),
    ));
    cluster.start_coordinator();
    cluster.add_worker("patient");
    wait_registered(&cluster, 1).await;
    let id = submit(&cluster, &tubingen_x_starry(32, 5));
    let done = wait_succeeded(&cluster, &id).await;
    assert!(!done.tasks[0].result.is_empty());
    let log = cluster.workers[0].log_text();
    assert_eq!(
        log.matches("reporting to the coordinator failed; retrying")
            .count(),
        6,
        "{log}"
    );
    let attempts = task_log(&cluster, &id, 0);
    assert_eq!(
        attempts.len(),
        1,
        "one attempt, not a second render: {attempts:#?}"
    );
    assert!(attempts[0].0.ends_with("\tsucceeded"), "{attempts:#?}");
}

/// A task's report on its way does not hold up the worker's next task (on a GPU, the device would wait for
/// the network): with the coordinator refusing results for a while (fail point
/// `coordinator-complete-task=4*return`, about 7 s of backoff), the worker renders a batch's second task
/// while the first's result is still being sent, and each task's result is taken from its first attempt.
/// The batch is limited to one worker (`--max-workers 1`): the task whose result is on its way holds no
/// place (the worker says so when it asks for the next: LeaseTaskRequest.reporting_lease_id).
#[tokio::test(flavor = "multi_thread")]
async fn the_next_task_renders_while_a_result_is_still_on_its_way() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 3.0, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-complete-task=4*return".into(),
    ));
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let mut args = batch_x_starry(32, 5);
    args.extend(["--max-workers", "1"].map(String::from));
    let id = submit(&cluster, &args);
    let done = wait_succeeded(&cluster, &id).await;
    assert_eq!(done.tasks.len(), 2);
    let log = cluster.workers[0].log_text();
    // the first line of task `task` that says `what`
    let line = |task: u32, what: &str| {
        let of_task = format!("task_id={task}");
        log.lines()
            .position(|l| l.contains(&of_task) && l.contains(what))
            .unwrap_or_else(|| panic!("task {task} never logged {what:?}: {log}"))
    };
    assert!(
        line(0, "reporting to the coordinator failed; retrying") < line(1, "rendered"),
        "{log}"
    );
    assert!(
        line(1, "rendered") < line(0, "task over"),
        "the second task rendered only once the first was reported: {log}"
    );
    for task in 0..2 {
        let attempts = task_log(&cluster, &id, task);
        assert_eq!(attempts.len(), 1, "task {task}: {attempts:#?}");
        assert!(attempts[0].0.ends_with("\tsucceeded"), "{attempts:#?}");
    }
}

/// redis-server SIGKILLed mid-job (append-only file on, fsynced at every write) and started again once the
/// worker's report has been refused (2 s at least): meanwhile the coordinator answers UNAVAILABLE to what
/// must be written (a submit, the worker's report) and serves reads; once Redis answers, the report the
/// worker retries lands and the job completes; the refused submit repeated with its request id gives one
/// job, and `stylefarm submit`, sent during the outage, sends its job again until it is taken (exit 0);
/// a new coordinator process started on the same Redis finds every job and result. The outage (6 s)
/// outlasts the coordinator's leader lease (5 s), not three of them: with no standby to take over, it
/// holds the lease again once Redis answers (before, it stopped, and the writes it held back were lost).
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restarted_mid_job_means_unavailable_meanwhile_and_nothing_lost() {
    let (mut cluster, mut services) = cluster_on(Backend::RedisS3, 1.5, 0.3);
    let redis = services.redis.as_mut().unwrap();
    cluster
        .coordinator_args
        .extend(["--leader-lease-secs".into(), "5".into()]);
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let first = submit_variant(&cluster, 0, "before-the-outage");
    wait_iteration(&cluster, &first, 2).await;
    let mut client = cluster.client().await;
    let spec = job(&mut client, &first).await.spec.unwrap();

    redis.kill();
    let outage = Instant::now();
    let refused = submit_spec(&client, &spec, "during-the-outage")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let again = submit_spec(&client, &spec, "during-the-outage")
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unavailable, "{again:?}");
    let cli_log = cluster.dir.path().join("submit.log");
    let cli_submit = stylefarm_tests::stylefarm()
        .arg("submit")
        .args(spec_args(1))
        .env("STYLEFARM_COORDINATOR", &cluster.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&cli_log).unwrap())
        .spawn()
        .unwrap();
    // reads are served meanwhile
    assert_eq!(job(&mut client, &first).await.job_id, first);
    // the worker finishes its render and its report is refused; it retries
    cluster.workers[0]
        .wait_logged(
            "reporting to the coordinator failed",
            Duration::from_secs(60),
        )
        .await;
    // and the CLI's submit refused once at least
    let refused_text = "the coordinator cannot take the job now";
    wait_for("the CLI's submit refused", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(&cli_log).unwrap_or_default();
        async move { log.contains(refused_text).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(outage.elapsed())).await;
    redis.restart();

    let done = wait_succeeded(&cluster, &first).await;
    assert!(!done.tasks[0].result.is_empty());
    // the submit the client was refused, repeated with its request id: one job
    let second = wait_for(
        "the store to take writes again",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let spec = spec.clone();
            async move { submit_spec(&client, &spec, "during-the-outage").await.ok() }
        },
    )
    .await;
    assert_eq!(
        submit_spec(&client, &spec, "during-the-outage")
            .await
            .unwrap(),
        second
    );
    let second_done = wait_succeeded(&cluster, &second).await;
    assert_eq!(
        second_done.tasks[0].result, done.tasks[0].result,
        "same spec, same pixels"
    );
    let sent = cli_submit.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&sent.stdout);
    let err = std::fs::read_to_string(&cli_log).unwrap();
    assert!(sent.status.success(), "{out} {err}");
    let third = wait_succeeded(&cluster, out.trim()).await;
    assert_eq!(third.tasks.len(), 1);

    // what Redis holds: a new coordinator process finds both jobs with their results (the old one stopped
    // with SIGTERM, which releases the leader lease: the new one need not wait 30 s for it to lapse)
    let old = cluster.coordinator.as_mut().unwrap();
    old.terminate();
    old.child.wait().unwrap();
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    let jobs = client.list(&[], 100).await.unwrap();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    for j in jobs {
        assert!(is(&j, pb::JobState::Succeeded), "{j:?}");
        let expected = if j.job_id == third.job_id {
            &third.tasks[0].result
        } else {
            &done.tasks[0].result
        };
        assert_eq!(&j.tasks[0].result, expected);
    }
}

/// A bug in the scheduler: the first lease panics while the scheduler's state is held (fail point
/// `coordinator-lease-locked`), which poisons its lock. The coordinator does not go on serving nothing
/// (every later call would panic, while it kept a leader lease): it stops within a second, exits non-zero
/// and says why. Started again on the same store, it loads the job from there, and the job succeeds.
async fn scheduler_panic_stops_the_coordinator(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 1.5, 0.3);
    let bug = (
        "FAILPOINTS".to_string(),
        "coordinator-lease-locked=1*panic(a scheduler bug)".to_string(),
    );
    cluster.coordinator_env.push(bug.clone());
    cluster.start_coordinator();
    let id = submit_variant(&cluster, 0, "before-the-bug");
    cluster.add_worker("w1");
    let coordinator = cluster.coordinator.as_mut().unwrap();
    let exited = wait_for("the coordinator to stop", Duration::from_secs(30), || {
        let status = coordinator.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(!exited.success(), "{exited:?}");
    let log = coordinator.log_text();
    assert!(log.contains("a scheduler bug"), "{log}");
    assert!(
        log.contains(
            "left its state in doubt; stopping, so that a restart loads the jobs from the store"
        ),
        "{log}"
    );
    cluster.coordinator_env.retain(|e| *e != bug);
    cluster.start_coordinator();
    let done = wait_succeeded(&cluster, &id).await;
    assert!(!done.tasks[0].result.is_empty(), "{done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_the_scheduler_stops_the_coordinator_and_a_restart_carries_the_job_on() {
    scheduler_panic_stops_the_coordinator(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_the_scheduler_stops_the_coordinator_and_a_restart_carries_the_job_on_on_redis_and_s3(
) {
    scheduler_panic_stops_the_coordinator(Backend::RedisS3).await;
}

/// A worker whose device runs out of memory on every render (fail point `engine-render-oom`): its failure
/// is no strike, the task goes to the other worker, with a larger device, as soon as there is one, the job
/// succeeds there, and the worker that ran out is still in the farm.
async fn out_of_memory_retried_elsewhere(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 1.5, 0.3);
    cluster
        .coordinator_args
        .extend(["--max-attempts".into(), "6".into()]);
    cluster.start_coordinator();
    // devices of 8 and 64 GiB as they declare them: once the larger one is live, the smaller one that ran
    // out is held back a lease period at each try
    let small = [
        ("FAILPOINTS", "engine-render-oom=return"),
        ("STYLEFARM_DEVICE_MEMORY", "8GiB"),
    ];
    cluster.add_worker_with_env("small", &small);
    wait_registered(&cluster, 1).await;
    let id = submit_variant(&cluster, 0, "oom");
    let client = cluster.client().await;
    wait_job(
        &client,
        &id,
        "the first attempt to run out of memory",
        Duration::from_secs(60),
        |s| s.tasks[0].error.contains("out of memory"),
    )
    .await;
    cluster.add_worker_with_env("big", &[("STYLEFARM_DEVICE_MEMORY", "64GiB")]);
    let done = wait_succeeded(&cluster, &id).await;
    assert!(
        done.tasks[0].worker_id.starts_with("big"),
        "{:?}",
        done.tasks[0]
    );
    assert!(
        done.strikes.is_empty(),
        "out of memory is no strike: {:?}",
        done.strikes
    );
    assert!(
        cluster.workers[0].child.try_wait().unwrap().is_none(),
        "the small worker stays"
    );
}

/// A tiled job's later scale planned whole for a worker that declares 16 GiB of device memory (640 x 480
/// px fits it), on a device that runs out of memory from 600 px a side (fail point
/// `engine-render-oom=return(600)`): the coordinator plans the scale again in tiles of at most three
/// quarters of that side (480 px), raised to the job's smallest tiles (512 px), which render, and the job
/// succeeds; the whole-canvas task is replaced, not failed, and no strike is taken. (Adam: one evaluation
/// an iteration, for time.)
#[tokio::test(flavor = "multi_thread")]
async fn a_tile_that_runs_out_of_memory_has_its_scale_planned_again_in_smaller_tiles() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 1.5, 0.3);
    cluster.start_coordinator();
    cluster.add_worker_with_env(
        "w1",
        &[
            ("FAILPOINTS", "engine-render-oom=return(600)"),
            ("STYLEFARM_DEVICE_MEMORY", "16GiB"),
        ],
    );
    wait_registered(&cluster, 1).await;
    let args = [
        "--content",
        &path("tubingen.jpg"),
        "--style",
        &path("starry_night.jpg"),
        "--tiled",
        "--size",
        "640",
        "--scales",
        "2",
        "--iterations",
        "2",
        "--optimizer",
        "adam",
    ];
    let id = submit(&cluster, &args);
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(300),
    )
    .await;
    let later: Vec<&pb::TaskStatus> = done
        .tasks
        .iter()
        .filter(|t| t.tile.as_ref().is_some_and(|p| p.scale == 1))
        .collect();
    let (replaced, tiles): (Vec<&pb::TaskStatus>, Vec<_>) =
        later.into_iter().partition(|t| t.replaced);
    assert_eq!(replaced.len(), 1, "the whole canvas, replaced: {done:?}");
    assert_eq!(replaced[0].state, pb::TaskState::Cancelled as i32);
    assert!(
        replaced[0].error.starts_with("replaced: scale 2/2 tile 1/1 (640x480 at 0,0) ran out of a device's memory on w1; the scale was planned again in tiles of at most 512 px"),
        "{:?}",
        replaced[0]
    );
    assert!(tiles.len() > 1, "{done:?}");
    for t in &tiles {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        let rect = t.tile.as_ref().unwrap();
        assert!(rect.width.max(rect.height) <= 512, "{t:?}");
    }
    assert!(
        done.strikes.is_empty(),
        "out of memory is no strike: {:?}",
        done.strikes
    );
    assert!(!done.result.is_empty(), "{done:?}");
    let (ok, out, err) = cluster.cli(&["status", &id]);
    let replaced_line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("replaced"));
    assert!(ok && replaced_line.is_some(), "{out} {err}");
}

/// A tiled job whose next scale is to be planned while no worker is live (a coordinator restarted between
/// the scales, its workers not back yet: the stitch held by the fail point `coordinator-stage-work` until
/// the coordinator and the worker are killed) waits for one, and plans the scale for the worker that comes
/// (16 GiB: the 640 x 480 scale whole), not in the smallest tiles, which a plan for no worker would cut.
/// A live worker the job may not run on (without its `--worker-tag`) is no worker to plan for: it waits on.
#[tokio::test(flavor = "multi_thread")]
async fn a_scale_to_plan_with_no_live_worker_waits_for_one() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 1.5, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-stage-work=1*sleep(60000)".into(),
    ));
    cluster.start_coordinator();
    let memory = [
        ("STYLEFARM_DEVICE_MEMORY", "16GiB"),
        ("STYLEFARM_WORKER_TAGS", "gpu"),
    ];
    cluster.add_worker_with_env("w1", &memory);
    wait_registered(&cluster, 1).await;
    let mut args = tubingen_x_starry(640, 1);
    args.extend(["--tiled", "--scales", "2", "--worker-tag", "gpu"].map(String::from));
    let id = submit(&cluster, &args);
    let client = cluster.client().await;
    wait_job(
        &client,
        &id,
        "the first scale",
        Duration::from_secs(120),
        |j| j.tasks[0].state == pb::TaskState::Succeeded as i32,
    )
    .await;
    cluster.workers[0].kill();
    cluster.coordinator.as_mut().unwrap().kill();
    cluster.coordinator_env.clear();
    cluster.start_coordinator();
    cluster.add_worker_with_env("untagged", &[("STYLEFARM_DEVICE_MEMORY", "16GiB")]);
    // w1's log (killed) says it registered before: 2 are the untagged one's too
    wait_registered(&cluster, 2).await;
    // the stitch is tried every 2 s: twice, and the scale is not planned
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waiting = job(&mut cluster.client().await, &id).await;
    assert!(is(&waiting, pb::JobState::Running), "{waiting:?}");
    assert_eq!(waiting.tasks.len(), 1, "{waiting:?}");
    cluster.add_worker_with_env("w2", &memory);
    let done = wait_succeeded(&cluster, &id).await;
    let planned: Vec<_> = done
        .tasks
        .iter()
        .filter_map(|t| t.tile.as_ref())
        .map(|t| (t.width, t.height))
        .collect();
    assert_eq!(planned, [(640, 480)], "{:?}", done.tasks);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_memory_is_retried_on_another_worker_and_is_no_strike() {
    out_of_memory_retried_elsewhere(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_memory_is_retried_on_another_worker_and_is_no_strike_on_redis_and_s3() {
    out_of_memory_retried_elsewhere(Backend::RedisS3).await;
}

/// A client killed after sending its submit, before the reply (the reply delayed 3 s by the fail point
/// `coordinator-submit-reply`), and the submit sent again with the same request id: one job. Sent a third
/// time: the same job again.
async fn submit_repeated_after_a_killed_client(backend: Backend) {
    let (mut cluster, _services) = cluster_on(backend, 1.5, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-submit-reply=1*sleep(3000)".into(),
    ));
    cluster.start_coordinator();
    let args = spec_args(1);
    let mut doomed = stylefarm()
        .arg("submit")
        .args(&args)
        .args(["--request-id", "killed-client"])
        .env("STYLEFARM_COORDINATOR", &cluster.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let coordinator = cluster.coordinator.as_ref().unwrap();
    coordinator
        .wait_logged("job submitted", Duration::from_secs(30))
        .await;
    doomed.kill().unwrap();
    let status = doomed.wait().unwrap();
    assert!(!status.success(), "killed before the reply");
    let mut repeat: Vec<&str> = args.iter().map(String::as_str).collect();
    repeat.extend(["--request-id", "killed-client"]);
    let id = submit(&cluster, &repeat);
    // the repeat says whose job it answers
    let (ok, out, err) = cluster.cli(&[&["submit"][..], &repeat].concat());
    assert!(ok && out.trim() == id, "{out} {err}");
    assert!(
        err.contains(&format!(
            "{id} was submitted before with request id killed-client"
        )),
        "{err}"
    );
    let mut client = cluster.client().await;
    let jobs = client.list(&[], 100).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        [id.as_str()],
        "one job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submit_repeated_after_its_client_was_killed_gives_one_job() {
    submit_repeated_after_a_killed_client(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submit_repeated_after_its_client_was_killed_gives_one_job_on_redis_and_s3() {
    submit_repeated_after_a_killed_client(Backend::RedisS3).await;
}

/// A slow blob store (each call held 2 s by the fail point `coordinator-blob-store`) holds up only the
/// calls that need it: while 16 downloads wait on it, a list answers at once, on a coordinator of 2 async
/// threads (blob store calls are made on the blocking pool, not on the threads that serve every call).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_blob_store_holds_up_only_the_calls_that_need_it() {
    let mut cluster = Cluster::new(3.0, 0.3, "embedded");
    cluster.coordinator_env.extend([
        ("TOKIO_WORKER_THREADS".into(), "2".into()),
        (
            "FAILPOINTS".into(),
            "coordinator-blob-store=sleep(2000)".into(),
        ),
    ]);
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    let png = std::fs::read(shared_image("chelsea.png")).unwrap();
    let hash = client.upload(&png, "chelsea.png").await.unwrap();
    let downloads: Vec<_> = (0..16)
        .map(|_| {
            let (mut client, hash) = (client.clone(), hash.clone());
            tokio::spawn(async move { client.download_bytes(&hash).await })
        })
        .collect();
    // the downloads are waiting on the store
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    client.list(&[], 10).await.unwrap();
    let listed = started.elapsed();
    // the list came while they waited (each waits 2 s on the store)
    assert!(
        downloads.iter().all(|d| !d.is_finished()),
        "the downloads ended before the list"
    );
    for download in downloads {
        assert_eq!(download.await.unwrap().unwrap(), png);
    }
    assert!(
        listed < Duration::from_millis(1000),
        "a list took {listed:?} behind the downloads"
    );
}

/// S3 stopped as a job's task starts: the worker cannot have its inputs, the coordinator answering
/// UNAVAILABLE (its blob store out of reach); it asks again, its task's lease kept by its heartbeats, with
/// no attempt spent, for as long as the outage lasts (here past three attempts' worth); S3 back, the task
/// renders on its first attempt. Before, each download that failed was a failed attempt, and a 5-s outage
/// failed the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_waits_for_its_inputs_while_s3_is_out_of_reach() {
    let (mut cluster, mut services) = cluster_on(Backend::RedisS3, 1.5, 0.3);
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let mut args = spec_args(0);
    let at = args.iter().position(|a| a == "--iterations").unwrap();
    args[at + 1] = "5".into();
    args.push("--paused".into());
    let id = submit(&cluster, &args);
    let s3 = services.s3.as_mut().unwrap();
    s3.stop();
    let (ok, out, err) = cluster.cli(&["resume", &id]);
    assert!(ok, "{out} {err}");
    cluster.workers[0]
        .wait_logged(
            "the coordinator cannot serve an input now",
            Duration::from_secs(30),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut client = cluster.client().await;
    let waiting = job(&mut client, &id).await;
    assert!(is(&waiting, pb::JobState::Running), "{waiting:?}");
    assert_eq!(waiting.tasks[0].attempts, 1, "{waiting:?}");
    s3.restart();
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done.tasks[0].attempts, 1, "{done:?}");
}

/// S3 stopped just as a sweep's tasks are done (the stage's work held 3 s by the fail point
/// `coordinator-stage-work`): the contact sheet cannot be read or stored, so the job waits at its stage,
/// running, not failed, and an upload answers UNAVAILABLE naming the blob store; S3 back on its address,
/// the work is tried again (every 2 s) and the job succeeds with its contact sheet.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_waits_while_s3_is_out_of_reach_and_completes_once_it_is_back() {
    let (mut cluster, mut services) = cluster_on(Backend::RedisS3, 1.5, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-stage-work=1*sleep(3000)".into(),
    ));
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let mut args = spec_args(0);
    args.extend(["--sweep".into(), "style_weight=10,1000".into()]);
    let id = submit(&cluster, &args);
    let mut client = cluster.client().await;
    wait_job(
        &client,
        &id,
        "the sweep's tasks to succeed",
        Duration::from_secs(120),
        |s| {
            assert!(!is(s, pb::JobState::Failed), "{}", s.error);
            s.tasks
                .iter()
                .all(|t| t.state == pb::TaskState::Succeeded as i32)
        },
    )
    .await;
    let s3 = services.s3.as_mut().unwrap();
    s3.stop();
    let coordinator = cluster.coordinator.as_ref().unwrap();
    coordinator
        .wait_logged(
            "a store is out of reach; the job waits",
            Duration::from_secs(30),
        )
        .await;
    let waiting = job(&mut client, &id).await;
    assert!(is(&waiting, pb::JobState::Running), "{waiting:?}");
    assert!(waiting.contact_sheet.is_empty());
    let mut png = Vec::new();
    image::RgbImage::new(16, 16)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let refused = client.upload(&png, "black.png").await.unwrap_err();
    match refused {
        stylefarm_client::ClientError::Status(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(s.message().contains("blob store out of reach"), "{s:?}");
        }
        e => panic!("upload: {e}"),
    }
    s3.restart();
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let sheet = client
        .download_bytes(&done.contact_sheet.parse().unwrap())
        .await
        .unwrap();
    let sheet = image::load_from_memory(&sheet).unwrap();
    assert!(sheet.width() > 48, "a contact sheet of the two variants");
}

/// A panic in a job's stage work (the fail point `coordinator-stage-work`, once) fails that job, naming the
/// panic, and the coordinator goes on; `stylefarm retry` runs the stage work again without rendering the
/// job's tasks again, and the sweep succeeds with its contact sheet.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_that_panics_fails_its_job_and_a_retry_runs_the_stage_again() {
    let (mut cluster, _services) = cluster_on(Backend::Embedded, 1.5, 0.3);
    cluster.coordinator_env.push((
        "FAILPOINTS".into(),
        "coordinator-stage-work=1*panic(a contact sheet bug)".into(),
    ));
    cluster.start_coordinator();
    cluster.add_worker("w1");
    wait_registered(&cluster, 1).await;
    let mut args = spec_args(0);
    args.extend(["--sweep".into(), "style_weight=10,1000".into()]);
    let id = submit(&cluster, &args);
    let failed = wait_state(
        &cluster,
        &id,
        pb::JobState::Failed,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        failed.error, "stage work: panicked: a contact sheet bug",
        "{failed:?}"
    );
    let rendered = |s: &pb::JobStatus| {
        s.tasks
            .iter()
            .all(|t| t.state == pb::TaskState::Succeeded as i32 && t.attempts == 1)
    };
    assert!(rendered(&failed), "{failed:?}");
    let (ok, out, err) = cluster.cli(&["retry", &id]);
    assert!(
        ok && out.contains("running\tits coordinator's step runs again"),
        "{out} {err}"
    );
    let done = wait_state(
        &cluster,
        &id,
        pb::JobState::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    assert!(!done.contact_sheet.is_empty(), "{done:?}");
    assert!(
        rendered(&done),
        "the tasks are not rendered again: {done:?}"
    );
}

/// The coordinator's data dir on a small file system of its own (a 24 MiB tmpfs in a mount namespace,
/// `unshare`), filled by uploads: the upload that does not fit fails RESOURCE_EXHAUSTED naming the full
/// storage, leaves no partial file, and everything stored before (images, a job) reads back unchanged; the
/// coordinator keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_write_with_resource_exhausted_and_loses_nothing() {
    let mut cluster = Cluster::new(1.5, 0.3, "embedded");
    std::fs::create_dir_all(&cluster.data_dir).unwrap();
    let probe = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .expect("unshare (util-linux) to give the coordinator a file system of its own");
    assert!(
        probe.success(),
        "unshare -rm failed: this test needs user and mount namespaces"
    );
    cluster.coordinator_wrapper = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        "mount -t tmpfs -o size=24m tmpfs \"$0\" && exec \"$@\"",
    ]
    .map(String::from)
    .to_vec();
    cluster
        .coordinator_wrapper
        .push(cluster.data_dir.display().to_string());
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    let content = client
        .upload_file(&stylefarm_tests::shared_image("tubingen.jpg"))
        .await
        .unwrap();
    let style = client
        .upload_file(&stylefarm_tests::shared_image("starry_night.jpg"))
        .await
        .unwrap();
    let id = submit_variant(&cluster, 0, "before-the-disk-filled");
    let before = job(&mut client, &id).await;

    // incompressible images of about 3 MB each, until one does not fit
    let mut rng = StdRng::seed_from_u64(seed());
    let mut stored = Vec::new();
    let full = loop {
        assert!(
            stored.len() < 20,
            "24 MiB never filled: {} images stored",
            stored.len()
        );
        let img = image::RgbImage::from_fn(1000, 1000, |_, _| image::Rgb(rng.random()));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        match client.upload(&png, "noise.png").await {
            Ok(hash) => stored.push((hash, png)),
            Err(stylefarm_client::ClientError::Status(e)) => break e,
            Err(e) => panic!("upload: {e}"),
        }
    };
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("storage full"), "{full:?}");
    assert!(!stored.is_empty());

    // nothing stored before is lost or changed, and the coordinator still answers
    for (hash, png) in &stored {
        assert_eq!(&client.download_bytes(hash).await.unwrap(), png);
    }
    for hash in [&content, &style] {
        assert!(!client.download_bytes(hash).await.unwrap().is_empty());
    }
    let after = job(&mut client, &id).await;
    assert_eq!(after, before);
    // a job's record is small: stored, or refused for the full disk, never an internal error
    match submit_spec(
        &client,
        before.spec.as_ref().unwrap(),
        "after-the-disk-filled",
    )
    .await
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
    }
    assert_eq!(job(&mut client, &id).await, before);
}
