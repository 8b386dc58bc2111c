#![doc = include_str!("../README.md")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stylefarm_client::FarmClient;
use stylefarm_proto::pb;

/// The `stylefarm` binary under test.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("STYLEFARM_BIN") {
        return bin.into();
    }
    // a test executable lives in target/<profile>/deps/
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("stylefarm");
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build --workspace --bins --tests --features \
         stylefarm/failpoints,stylefarm-worker/failpoints, as deploy/test.sh does) or set STYLEFARM_BIN",
        bin.display()
    );
    bin
}

/// libtorch's CPU threads in a test's processes: one. nextest runs two tests at a time on CI's two cores,
/// and a process per node, so each engine with a thread per core oversubscribed them: measured with
/// tests/shards.rs (3 tests, 2 at a time, 2 cores), 297 s of CPU and 155 s wall with a thread per core,
/// 194 s and 104 s with one.
pub const LIBTORCH_THREADS: i32 = 1;

/// A command running the `stylefarm` binary under test with [`LIBTORCH_THREADS`].
pub fn stylefarm() -> Command {
    let mut command = Command::new(binary());
    with_libtorch_threads(&mut command);
    command
}

/// Gives `command`'s process [`LIBTORCH_THREADS`] through `OMP_NUM_THREADS`, which libtorch reads for its
/// default (a worker's `--threads` or `local` overrides it).
fn with_libtorch_threads(command: &mut Command) -> &mut Command {
    command.env("OMP_NUM_THREADS", LIBTORCH_THREADS.to_string())
}

/// Sets this test process' libtorch CPU threads to [`LIBTORCH_THREADS`]: for tests that run the engine
/// in-process (each thread that calls into libtorch takes it up).
pub fn one_libtorch_thread() {
    tch::set_num_threads(LIBTORCH_THREADS);
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The VGG19 weights the set-up installed (`stylefarm weights path`): for tests that load the engine
/// themselves.
pub fn weights() -> PathBuf {
    let out = stylefarm().args(["weights", "path"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    line.split('\t').next().unwrap().trim().into()
}

/// How far two 8-bit images of the same size (their raw samples) are apart, in levels of 255: the largest
/// difference of a sample, and the mean.
pub fn pixel_difference(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let diffs: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let max = diffs.iter().max().copied().unwrap_or(0);
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len().max(1) as f64;
    (max, mean)
}

/// The test image `name` in `../shared/data/images` beside the repository; panics when it is missing.
pub fn shared_image(name: &str) -> PathBuf {
    let path = repo().join("../shared/data/images").join(name);
    assert!(
        path.exists(),
        "{} missing: the tests read ../shared/data beside the repository",
        path.display()
    );
    path
}

/// The names of the files in `dir`, sorted (what a command wrote there).
pub fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A child process killed when the handle drops.
pub struct Node {
    /// The `stylefarm` process.
    pub child: Child,
    /// The file the process logs to (its stderr).
    pub log: PathBuf,
}

impl Node {
    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// SIGTERM, as an operator would.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// The process's log so far; empty when it cannot be read.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` until the process has logged `text` ([`wait_for`]).
    pub async fn wait_logged(&self, text: &str, timeout: Duration) {
        wait_for(&format!("the log to say {text:?}"), timeout, || async {
            self.log_text().contains(text).then_some(())
        })
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A farm in a sandbox: a `stylefarm coordinator` and `stylefarm worker` processes on 127.0.0.1, their data
/// and logs in a temporary directory.
pub struct Cluster {
    /// The coordinator's data dir (`state.redb`, `blobs/`), kept across its restarts.
    pub data_dir: PathBuf,
    /// The coordinator's URL, `http://<addr>`, for clients, workers and the CLI.
    pub url: String,
    /// The coordinator's listen address: `127.0.0.1:0` before its first start, then the port it bound, which
    /// restarts reuse.
    pub addr: String,
    /// The coordinator process; `None` only before its first start.
    pub coordinator: Option<Node>,
    /// The worker processes, in the order they were added.
    pub workers: Vec<Node>,
    /// How long a lease lasts without a heartbeat, in seconds (`--lease-secs`).
    pub lease_secs: f64,
    /// How often workers are asked to heartbeat, in seconds (`--heartbeat-secs`).
    pub heartbeat_secs: f64,
    /// Where the coordinator keeps jobs and tasks (`--store`): `embedded` or a Redis URL.
    pub store: String,
    /// More arguments for the coordinator's next starts.
    pub coordinator_args: Vec<String>,
    /// More environment variables for the coordinator's next starts (e.g. an S3 store's endpoint).
    pub coordinator_env: Vec<(String, String)>,
    /// A command that runs the coordinator's command line, e.g. `unshare` to give it a file system of its
    /// own; empty: the coordinator runs directly.
    pub coordinator_wrapper: Vec<String>,
    /// Environment variables for [`Cluster::cli`]'s commands (e.g. `STYLEFARM_TOKEN`).
    pub cli_env: Vec<(String, String)>,
    /// The temporary directory of the data dir and the logs; deleted when the cluster drops, after the
    /// processes above are killed (fields drop in declaration order).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// A coordinator with short leases and heartbeats, no workers yet.
    pub fn start(lease_secs: f64, heartbeat_secs: f64) -> Cluster {
        Cluster::start_on_store(lease_secs, heartbeat_secs, "embedded")
    }

    /// [`Cluster::start`] with the coordinator's jobs and tasks in `store` (`--store`: `embedded`, or a
    /// Redis URL).
    pub fn start_on_store(lease_secs: f64, heartbeat_secs: f64, store: &str) -> Cluster {
        let mut cluster = Cluster::new(lease_secs, heartbeat_secs, store);
        cluster.start_coordinator();
        cluster
    }

    /// A cluster not started yet: set its fields, then [`Cluster::start_coordinator`].
    pub fn new(lease_secs: f64, heartbeat_secs: f64, store: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        Cluster {
            dir,
            data_dir,
            url: String::new(),
            addr: "127.0.0.1:0".into(),
            coordinator: None,
            workers: Vec::new(),
            lease_secs,
            heartbeat_secs,
            store: store.to_string(),
            coordinator_args: Vec::new(),
            coordinator_env: Vec::new(),
            coordinator_wrapper: Vec::new(),
            cli_env: Vec::new(),
        }
    }

    /// Starts (or restarts, on the same data dir and address) the coordinator.
    pub fn start_coordinator(&mut self) {
        // one log per start: a restarted coordinator does not truncate its predecessor's
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.path().join(format!("coordinator-{start}.log"));
        let mut command = match self.coordinator_wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                with_libtorch_threads(c.args(args).arg(binary()));
                c
            }
            None => stylefarm(),
        };
        let mut child = command
            .args(["coordinator", "--listen", &self.addr, "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--lease-secs",
                &self.lease_secs.to_string(),
                "--heartbeat-secs",
                &self.heartbeat_secs.to_string(),
                "--store",
                &self.store,
            ])
            .args(&self.coordinator_args)
            .envs(self.coordinator_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("coordinator said {line:?}"));
        self.addr = addr.to_string();
        self.url = format!("http://{addr}");
        self.coordinator = Some(Node { child, log });
    }

    /// Starts a CPU worker named `name` against the coordinator.
    pub fn add_worker(&mut self, name: &str) {
        self.add_worker_with_env(name, &[]);
    }

    /// A worker with extra environment variables, e.g. `FAILPOINTS` to inject faults (the tests' binary is
    /// built with the `failpoints` feature: deploy/test.sh).
    pub fn add_worker_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let child = stylefarm()
            .envs(env.iter().copied())
            .args([
                "worker",
                "--coordinator",
                &self.url,
                "--device",
                "cpu",
                "--name",
                name,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.workers.push(Node { child, log });
    }

    /// A client of the coordinator, retried for up to 10 s while it starts.
    pub async fn client(&self) -> FarmClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match FarmClient::connect(&self.url).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot reach {}: {e}", self.url),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Runs the CLI against this cluster; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = stylefarm()
            .args(args)
            .env("STYLEFARM_COORDINATOR", &self.url)
            .envs(self.cli_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
}

/// The address a node logged for an HTTP endpoint of its, from its line "`what` on http://ADDR/..."
/// (or https), e.g. `what` = "metrics" or "status page".
pub async fn logged_addr(node: &Node, what: &str) -> String {
    let prefix = format!("{what} on http");
    wait_for(what, Duration::from_secs(60), || async {
        let log = node.log_text();
        let at = log.find(&prefix)? + prefix.len();
        let rest = log[at..].trim_start_matches('s').strip_prefix("://")?;
        Some(rest[..rest.find('/')?].to_string())
    })
    .await
}

/// The address a node logged for its metrics ("metrics on http://ADDR/metrics").
pub async fn metrics_addr(node: &Node) -> String {
    logged_addr(node, "metrics").await
}

/// `GET /metrics` over HTTP/1.1: the status line must say 200; returns the body.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (a name with its labels, as written), if the text has it.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of job `job_id`; panics when the call fails.
pub async fn job(client: &mut FarmClient, job_id: &str) -> pb::JobStatus {
    client.job(&job_id.into()).await.unwrap()
}

/// Whether the job's state is `state`.
pub fn is(status: &pb::JobStatus, state: pb::JobState) -> bool {
    status.state == state as i32
}

/// The path of the test image `name` ([`shared_image`]), as a string for the CLI.
pub fn path(name: &str) -> String {
    shared_image(name).display().to_string()
}

/// Waits (up to 60 s) until `n` of the cluster's workers have logged their registration.
pub async fn wait_registered(cluster: &Cluster, n: usize) {
    wait_for("workers to register", Duration::from_secs(60), || async {
        (cluster
            .workers
            .iter()
            .filter(|w| w.log_text().contains("registered"))
            .count()
            >= n)
            .then_some(())
    })
    .await;
}

/// Task `task`'s log as `stylefarm log` prints it: for each attempt, its header line (number, worker, start,
/// duration, outcome) and its worker's lines.
pub fn task_log(cluster: &Cluster, job_id: &str, task: u32) -> Vec<(String, String)> {
    let (ok, out, err) = cluster.cli(&["log", job_id, &task.to_string()]);
    assert!(ok, "log failed: {err}");
    let mut attempts: Vec<(String, String)> = Vec::new();
    for line in out.lines() {
        match attempts.last_mut() {
            Some((_, lines)) if line.starts_with("  ") => {
                lines.push_str(line);
                lines.push('\n');
            }
            _ => attempts.push((line.to_string(), String::new())),
        }
    }
    attempts
}

/// Submits with the CLI; returns the job id.
pub fn submit(cluster: &Cluster, args: &[impl AsRef<str>]) -> String {
    let args: Vec<&str> = std::iter::once("submit")
        .chain(args.iter().map(AsRef::as_ref))
        .collect();
    let (ok, out, err) = cluster.cli(&args);
    assert!(ok, "submit failed: {err}");
    out.trim().to_string()
}

/// Waits up to `timeout` for `child` to exit, and returns how it did; past that, kills it and panics
/// saying that `what` did not happen.
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("{what} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 120 s) until the job succeeded ([`wait_state`]); its status.
pub async fn wait_succeeded(cluster: &Cluster, job_id: &str) -> pb::JobStatus {
    wait_state(
        cluster,
        job_id,
        pb::JobState::Succeeded,
        Duration::from_secs(120),
    )
    .await
}

/// Waits up to `timeout` for job `job_id` to reach `state`; panics when it ends in another state.
pub async fn wait_state(
    cluster: &Cluster,
    job_id: &str,
    state: pb::JobState,
    timeout: Duration,
) -> pb::JobStatus {
    let mut client = cluster.client().await;
    wait_for(&format!("job {job_id} to be {state:?}"), timeout, || {
        let mut client = client.clone();
        async move {
            let s = job(&mut client, job_id).await;
            assert!(
                !(s.state >= pb::JobState::Succeeded as i32 && s.state != state as i32),
                "job ended {:?}: {}",
                s.state,
                s.error
            );
            is(&s, state).then_some(s)
        }
    })
    .await;
    job(&mut client, job_id).await
}

/// Waits up to `timeout` for `until` to hold of job `job_id`'s status ([`wait_for`], `what` naming it).
pub async fn wait_job(
    client: &FarmClient,
    job_id: &str,
    what: &str,
    timeout: Duration,
    until: impl Fn(&pb::JobStatus) -> bool,
) {
    wait_for(what, timeout, || {
        let mut client = client.clone();
        let until = &until;
        async move { until(&job(&mut client, job_id).await).then_some(()) }
    })
    .await
}

/// A task's latest iteration (0 before its worker reported any).
pub fn iteration(task: &pb::TaskStatus) -> u32 {
    task.progress.as_ref().map_or(0, |p| p.iteration)
}

/// Waits (up to 60 s) until the job's first task runs and has reported iteration `at_least`.
pub async fn wait_iteration(cluster: &Cluster, job_id: &str, at_least: u32) {
    let client = cluster.client().await;
    wait_for("the task to be rendering", Duration::from_secs(60), || {
        let mut client = client.clone();
        async move {
            let s = job(&mut client, job_id).await;
            (s.tasks[0].state == pb::TaskState::Running as i32
                && iteration(&s.tasks[0]) >= at_least)
                .then_some(())
        }
    })
    .await;
}

/// The arguments of a render of tubingen.jpg in the style of starry_night.jpg at `size` px for
/// `iterations`.
pub fn tubingen_x_starry(size: u32, iterations: u32) -> Vec<String> {
    x_starry("tubingen.jpg", size, iterations)
}

/// The arguments of a batch of two renders, tubingen.jpg and chelsea.png each in the style of
/// starry_night.jpg, at `size` px for `iterations`.
pub fn batch_x_starry(size: u32, iterations: u32) -> Vec<String> {
    let mut args = vec!["--content".into(), path("chelsea.png"), "--batch".into()];
    args.extend(tubingen_x_starry(size, iterations));
    args
}

/// The arguments of an exact-mode Adam job that two workers share: [`exact_x_starry`] with Adam.
pub fn two_shards_x_starry(scale_iterations: &str) -> Vec<String> {
    let mut args = exact_x_starry(scale_iterations);
    args.extend(["--optimizer", "adam"].map(String::from));
    args
}

/// The arguments of an exact-mode job (the default optimizer): tubingen.jpg in the style of
/// starry_night.jpg at 192 px, its scale 2 (192 x 144 in 128-px blocks: 3 x 3 blocks of 64 px and their
/// halos) two shards on two workers after scale 1 (96 px) whole; `scale_iterations` as
/// `--scale-iterations` says (two values). 192 px, not 256: 3 x 3 blocks, not 4 x 3 (`local` on two
/// workers with `4,12`: 25 s, 43 s at 256 px), and the tests that render it are among CI's slowest.
pub fn exact_x_starry(scale_iterations: &str) -> Vec<String> {
    let mut args = x_starry("tubingen.jpg", 192, 1);
    // --scale-iterations gives every scale's
    args.truncate(args.len() - 2);
    args.extend(
        [
            "--scale-iterations",
            scale_iterations,
            "--tiled",
            "--exact",
            "--tile-size",
            "128",
            "--overlap",
            "64",
        ]
        .map(String::from),
    );
    args
}

/// The arguments of a render of the shared image `content` in the style of starry_night.jpg at `size` px
/// for `iterations`.
pub fn x_starry(content: &str, size: u32, iterations: u32) -> Vec<String> {
    [
        "--content".into(),
        path(content),
        "--style".into(),
        path("starry_night.jpg"),
        "--size".into(),
        size.to_string(),
        "--iterations".into(),
        iterations.to_string(),
    ]
    .into()
}
