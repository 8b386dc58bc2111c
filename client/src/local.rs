//! [`LocalFarm`]: a coordinator on 127.0.0.1 and workers in this process, for one machine's jobs.

use std::path::PathBuf;

use stylefarm_coordinator::{Coordinator, CoordinatorConfig};
use stylefarm_worker::WorkerConfig;
use tokio::task::JoinHandle;

use crate::{ClientError, FarmClient};

/// Why a [`LocalFarm`] did not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalFarmError {
    /// The coordinator could not open its data dir or bind its port.
    #[error("coordinator: {0}")]
    Coordinator(#[from] stylefarm_coordinator::Error),
    /// No loopback port, or no temporary data dir.
    #[error("{what}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The client could not connect to the embedded coordinator.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// How long [`LocalFarm::shutdown`] waits for a cancelled render to stop: it stops at its next iteration,
/// which on a CPU can take a while for a large image.
pub const RENDER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A coordinator served on a free port of 127.0.0.1 with workers as tasks of this process's runtime
/// (each with its own engine thread). [`LocalFarm::shutdown`] stops them all; a farm dropped without it
/// signals them to stop (the workers finish their current task) and does not wait.
pub struct LocalFarm {
    url: String,
    /// Stops the coordinator's server ([`LocalFarm::shutdown`], after the workers).
    stop: tokio::sync::watch::Sender<bool>,
    /// Stops the workers.
    stop_workers: tokio::sync::watch::Sender<bool>,
    server: JoinHandle<Result<(), stylefarm_coordinator::Error>>,
    /// Each worker's task; `None` once [`LocalFarm::workers_gone`] saw it end.
    workers: Vec<Option<JoinHandle<Result<(), stylefarm_worker::Error>>>>,
    coordinator: std::sync::Arc<Coordinator>,
    // the data dir when the config names none; removed on drop unless kept (keep_data_dir)
    data_dir: Option<tempfile::TempDir>,
}

impl LocalFarm {
    /// Starts the coordinator and one worker per config (their `coordinator` URL is set to this farm's).
    /// `coordinator.data_dir` empty: a temporary directory, removed when the farm drops.
    pub async fn start(
        mut coordinator: CoordinatorConfig,
        workers: Vec<WorkerConfig>,
    ) -> Result<LocalFarm, LocalFarmError> {
        let io = |what| move |source| LocalFarmError::Io { what, source };
        let tmp = if coordinator.data_dir.as_os_str().is_empty() {
            let tmp = tempfile::tempdir().map_err(io("temporary data dir"))?;
            coordinator.data_dir = PathBuf::from(tmp.path());
            Some(tmp)
        } else {
            None
        };
        // opening steps the stages left awaiting (stitches, contact sheets): off the async threads
        let state = crate::off_async(|| Coordinator::open(coordinator))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("binding 127.0.0.1"))?;
        let url = format!(
            "http://{}",
            listener.local_addr().map_err(io("binding 127.0.0.1"))?
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (stop_workers, workers_stopped) = tokio::sync::watch::channel(false);
        let on_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.changed().await;
        };
        let server = tokio::spawn(stylefarm_coordinator::serve(
            listener,
            state.clone(),
            on_stop(stopped.clone()),
        ));
        let workers = workers
            .into_iter()
            .map(|mut config| {
                config.coordinator = url.clone();
                Some(tokio::spawn(stylefarm_worker::run(
                    config,
                    on_stop(workers_stopped.clone()),
                    std::future::pending(),
                )))
            })
            .collect();
        Ok(LocalFarm {
            url,
            stop,
            stop_workers,
            server,
            workers,
            coordinator: state,
            data_dir: tmp,
        })
    }

    /// Keeps the temporary data dir that the farm made (its config named none) when the farm stops, with
    /// the jobs and their images (for a coordinator started on it to serve them); returns its path.
    /// `None` where the config named the data dir, which is kept anyway.
    pub fn keep_data_dir(&mut self) -> Option<PathBuf> {
        self.data_dir.take().map(tempfile::TempDir::keep)
    }

    /// The coordinator's URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Serves the coordinator's status page ([`stylefarm_coordinator::status`]) on `listener`, answering
    /// requests for its IP addresses, localhost and `allowed_hosts` (the farm has no tokens); returns its
    /// address.
    pub async fn serve_status(
        &self,
        listener: std::net::TcpListener,
        allowed_hosts: &[String],
    ) -> Result<std::net::SocketAddr, LocalFarmError> {
        Ok(stylefarm_coordinator::status::serve_status(
            listener,
            self.coordinator.clone(),
            allowed_hosts,
        )
        .await?)
    }

    /// A client of this farm's coordinator.
    pub async fn client(&self) -> Result<FarmClient, ClientError> {
        FarmClient::connect(&self.url).await
    }

    /// Waits until every worker has stopped, and says why each did (a worker whose engine cannot render
    /// any more leaves the farm: stylefarm_worker's `Error::EngineLost`). A job of a farm whose workers
    /// have all left would wait for a worker forever: race this against it.
    pub async fn workers_gone(&mut self) -> Vec<String> {
        let mut reasons = Vec::new();
        for slot in &mut self.workers {
            let Some(worker) = slot else {
                continue;
            };
            let ended = worker.await;
            // polled to its end: not again (shutdown)
            *slot = None;
            reasons.push(match ended {
                Ok(Ok(())) => "it stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("it stopped: {e}"),
            });
        }
        reasons
    }

    /// Stops the workers (a task in progress is abandoned, its render cancelled) and the coordinator, and
    /// waits for the server, and for the engine threads' renders to stop (at most [`RENDER_STOP_WAIT`]):
    /// a process that exits while libtorch renders can crash in its teardown.
    pub async fn shutdown(self) {
        // the workers first: a worker whose coordinator went first would warn that it cannot reach it
        // (a job refused at its submit printed "lease failed; reconnecting" before its error)
        let _ = self.stop_workers.send(true);
        let workers: Vec<_> = self.workers.into_iter().flatten().collect();
        for w in &workers {
            w.abort();
        }
        // dropped, their tasks' renders are cancelled
        for w in workers {
            let _ = w.await;
        }
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let waited = std::time::Instant::now();
        while stylefarm_worker::renders_running() > 0 && waited.elapsed() < RENDER_STOP_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
