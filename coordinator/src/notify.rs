//! Job-end notifications (webhooks): when a job ends (succeeded, failed or cancelled), the coordinator
//! POSTs a JSON document about it ([`JobEnded`]) to the URL its operator gave (`stylefarm coordinator
//! --notify-url`), as OpenCue mails a job's owner and Deadline's event plugins run when a job finishes: a
//! chat bot, a pipeline's next step or a ticket can follow the farm without polling it.
//!
//! Each end of a job that this coordinator sees while it serves is sent until a 2xx answer, at most
//! [`NOTIFY_TRIES`] times (the same body and `X-Stylefarm-Delivery` header, by which a receiver drops a
//! repeat), after [`stylefarm_proto::Backoff`]'s waits, or the wait an answer asks for in its `Retry-After`
//! (up to [`MAX_RETRY_AFTER`]) when longer; a 4xx answer other than 408 and 429 says the receiver
//! refuses it, and a redirect that the URL is not the receiver's own: neither is sent again. While the
//! receiver is away, at most [`MAX_QUEUED`] notifications wait; one more is dropped. Each end is marked with
//! its job as it ends ([`crate::model::JobMeta::unannounced`]) and unmarked once delivered, refused or
//! given up on; a coordinator that starts on the store announces those still marked (its predecessor stopped,
//! or was killed, with their deliveries under way or waiting; they ended while a standby took over), at most
//! [`MAX_QUEUED`] / 2 waiting at once beside the new ends: at least once, a receiver dropping a delivery id
//! it has seen. Ends from before notifications were on are not marked. A job run again (`stylefarm retry`) is
//! announced again when it ends again. Outcomes are counted in `stylefarm_notifications_total`
//! ([`crate::metrics`]).
//!
//! The URL is the operator's, not a client's (a client could otherwise make the coordinator call any
//! address it reaches). A receiver's secret can go in the URL, as chat services' incoming webhooks take
//! it; the logs name only the URL's host. Each POST carries [Standard Webhooks]' `webhook-id` (the
//! delivery id) and `webhook-timestamp` (the try's, Unix seconds), and with a signing secret
//! ([`SigningSecret`]) their `webhook-signature`, an HMAC-SHA256 of id, timestamp and body made by the
//! standard's reference library, which a receiver checks with its own (and drops a stale timestamp: a
//! replay). With several secrets (a rotation: the new one and the old, [`SigningSecret::list`]) each
//! POST carries a signature by each, space-separated as the standard has it, and a receiver that knows
//! either accepts it.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use stylefarm_core::ids::JobId;
use tokio::sync::broadcast::error::RecvError;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{label, Labels};
use crate::model::{JobMeta, TaskRecord, TaskState};
use crate::scheduler::{now_ms, Scheduler};

/// Tries of one notification's POST before it is given up.
pub const NOTIFY_TRIES: u32 = 10;

/// How long one try may take, answer included.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait a receiver's `Retry-After` gets: one that asks for more is sent
/// again after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Notifications being sent at once; more wait for one to be done.
const SENDING_AT_ONCE: usize = 8;

/// Notifications being sent or waiting to be sent, at most: while a receiver is away (each try of a
/// delivery waits up to [`NOTIFY_TIMEOUT`]) one more is dropped rather than held.
pub const MAX_QUEUED: usize = 1000;

/// Where the coordinator announces the jobs that end.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyConfig {
    /// An `http://` or `https://` URL, POSTed a [`JobEnded`] as JSON when a job ends.
    pub url: reqwest::Url,
    /// The keys that sign each POST (`webhook-signature`, a signature by each); none: unsigned.
    pub secrets: Vec<SigningSecret>,
}

/// Bytes of a signing secret, at least and at most: Standard Webhooks' bounds.
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A Standard Webhooks signing secret: `whsec_` and the base64 of [`SECRET_BYTES`] random bytes, as the
/// standard's libraries and webhook services write them (e.g.
/// `echo whsec_$(head -c 32 /dev/urandom | base64)`). Shown as `whsec_...` only.
#[derive(Clone, PartialEq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(whsec_...)")
    }
}

impl std::str::FromStr for SigningSecret {
    type Err = String;

    /// `whsec_<base64>`, surrounding white space ignored; an error says what is wrong (not the text).
    fn from_str(text: &str) -> Result<SigningSecret, String> {
        use base64::Engine as _;
        let expected = format!(
            "expected whsec_ and the base64 of {} to {} random bytes (e.g. `echo whsec_$(head -c 32 \
             /dev/urandom | base64)`)",
            SECRET_BYTES.start(),
            SECRET_BYTES.end()
        );
        let encoded = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or_else(|| format!("does not start with whsec_: {expected}"))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            // not the decoder's error, which names a character of the secret and its place
            .map_err(|_| format!("not base64 after whsec_: {expected}"))?;
        if !SECRET_BYTES.contains(&key.len()) {
            return Err(format!("{} bytes: {expected}", key.len()));
        }
        Ok(SigningSecret(key))
    }
}

impl SigningSecret {
    /// Secrets separated by white space (spaces, or one a line): to rotate a receiver's secret, the new
    /// one and the old are given until the receiver has the new one. Each as [`SigningSecret::from_str`]
    /// takes it; an error names the one that is wrong by its place (not its text).
    ///
    /// [`SigningSecret::from_str`]: std::str::FromStr::from_str
    pub fn list(text: &str) -> Result<Vec<SigningSecret>, String> {
        let texts: Vec<&str> = text.split_whitespace().collect();
        if texts.is_empty() {
            return Err("empty".into());
        }
        let n = texts.len();
        (texts.iter().enumerate())
            .map(|(i, t)| match n {
                1 => t.parse(),
                // a piece that is not a secret may be the rest of one that a tool wrapped
                _ if !t.starts_with("whsec_") => Err(format!(
                    "secret {} of {n} does not start with whsec_: give each secret whole (a key \
                     wrapped over two lines?)",
                    i + 1
                )),
                _ => t
                    .parse()
                    .map_err(|e| format!("secret {} of {n}: {e}", i + 1)),
            })
            .collect()
    }
}

impl std::str::FromStr for NotifyConfig {
    type Err = String;

    /// An absolute `http://` or `https://` URL; an error says what is wrong with it (not the text: it may
    /// hold a secret).
    fn from_str(text: &str) -> Result<NotifyConfig, String> {
        let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "a {}: URL; expected an http:// or https:// URL with a host",
                url.scheme()
            ));
        }
        Ok(NotifyConfig {
            url,
            secrets: Vec::new(),
        })
    }
}

/// What a notification says of a job that ended, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEnded {
    /// Always `job_ended`.
    pub event: &'static str,
    /// The job's id.
    pub job_id: String,
    /// Its name for people (`submit --name`); empty when it has none.
    pub name: String,
    /// The tenant that submitted it; empty when auth is off.
    pub tenant: String,
    /// `single`, `batch`, `sweep`, `tiled` or `video`.
    pub kind: &'static str,
    /// `succeeded`, `failed` or `cancelled`.
    pub state: &'static str,
    /// Why it failed (`cancelled` for a cancelled job); empty when it succeeded.
    pub error: String,
    /// Its tasks.
    pub tasks: usize,
    /// Those that succeeded.
    pub succeeded: usize,
    /// Those that failed for good.
    pub failed: usize,
    /// Those cancelled.
    pub cancelled: usize,
    /// When it was submitted, ms since the Unix epoch.
    pub submitted_ms: i64,
    /// When it ended, ms since the Unix epoch.
    pub finished_ms: i64,
}

impl JobEnded {
    fn of(meta: &JobMeta, tasks: &[TaskRecord]) -> JobEnded {
        let count = |state: TaskState| tasks.iter().filter(|t| t.state == state).count();
        JobEnded {
            event: "job_ended",
            job_id: meta.id.to_string(),
            name: meta.spec.name.clone(),
            tenant: meta.tenant.clone(),
            kind: meta.spec.kind.name(),
            state: meta.state.name(),
            error: meta.error.clone(),
            tasks: tasks.len(),
            succeeded: count(TaskState::Succeeded),
            failed: count(TaskState::Failed),
            cancelled: count(TaskState::Cancelled),
            submitted_ms: meta.submitted_ms,
            finished_ms: meta.finished_ms,
        }
    }

    /// The id of this end of the job, the same in every try of its delivery: `<job id>@<finished_ms>`.
    pub fn delivery(&self) -> String {
        format!("{}@{}", self.job_id, self.finished_ms)
    }
}

/// How one notification's delivery ended, as `stylefarm_notifications_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// A 2xx answer.
    Delivered,
    /// A 4xx answer other than 408 and 429: the receiver refuses it.
    Refused,
    /// No 2xx answer in [`NOTIFY_TRIES`] tries, or a redirect.
    GaveUp,
    /// Not sent: [`MAX_QUEUED`] others were waiting.
    Dropped,
}

impl Delivered {
    /// Its label value: `delivered`, `refused`, `gave_up` or `dropped`.
    pub fn name(self) -> &'static str {
        match self {
            Delivered::Delivered => "delivered",
            Delivered::Refused => "refused",
            Delivered::GaveUp => "gave_up",
            Delivered::Dropped => "dropped",
        }
    }
}

/// Announces every job that ends from now on, and those whose end is still to be announced
/// ([`Scheduler::unannounced`]: [the module's docs](self)), until the scheduler's changes end; each
/// delivery's outcome counted in `counted` (by `outcome`) and recorded with its job
/// ([`Scheduler::announced`]).
pub(crate) async fn run(
    scheduler: Arc<Scheduler>,
    config: NotifyConfig,
    counted: Family<Labels, Counter>,
) {
    let delivered = move |outcome: Delivered| {
        counted
            .get_or_create(&label("outcome", outcome.name()))
            .inc();
    };
    let mut changes = scheduler.subscribe();
    // the ends the coordinators before did not announce (subscribed first: an end from now on is among
    // these or comes as a change, or both)
    let mut missed = std::collections::VecDeque::from(scheduler.unannounced());
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let client = match http_client() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "job-end notifications are off: no HTTP client");
            return;
        }
    };
    let host = config.url.host_str().unwrap_or_default().to_string();
    let signing = match (config.secrets.into_iter())
        .map(|s| standardwebhooks::Webhook::from_bytes(s.0))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(signing) => Arc::new(signing),
        Err(e) => {
            tracing::error!(error = %e, "job-end notifications are off: no signing key");
            return;
        }
    };
    let url = Arc::new(config.url);
    let sending = Arc::new(tokio::sync::Semaphore::new(SENDING_AT_ONCE));
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // each job's end announced, by its finished_ms (a job run again ends again later)
    let mut announced: HashMap<JobId, i64> = HashMap::new();
    loop {
        // the missed ends take at most half the room, at their pace: the new ends go on meanwhile
        let room = (MAX_QUEUED / 2).saturating_sub(queued.load(relaxed));
        let change = if missed.is_empty() {
            changes.recv().await
        } else if room == 0 {
            tokio::select! {
                change = changes.recv() => change,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        } else {
            Ok(missed.pop_front().expect("not empty"))
        };
        let ids = match change {
            Ok(id) => vec![id],
            // changes missed: the jobs that ended meanwhile are among those still to announce
            Err(RecvError::Lagged(_)) => scheduler.unannounced(),
            Err(RecvError::Closed) => return,
        };
        for id in ids {
            let ended = scheduler.ended_with(&id, |meta, tasks| {
                let new = meta.unannounced && announced.get(&id) != Some(&meta.finished_ms);
                new.then(|| JobEnded::of(meta, tasks))
            });
            let ended = match ended {
                Some(Some(ended)) => ended,
                Some(None) => continue,
                // running again, or deleted: whatever ends next is new
                None => {
                    announced.remove(&id);
                    continue;
                }
            };
            announced.insert(id, ended.finished_ms);
            if queued.fetch_add(1, relaxed) >= MAX_QUEUED {
                queued.fetch_sub(1, relaxed);
                tracing::error!(
                    job_id = ended.job_id,
                    host,
                    waiting = MAX_QUEUED,
                    "a job-end notification dropped: as many wait for the receiver"
                );
                delivered(Delivered::Dropped);
                continue;
            }
            let (client, url, host) = (client.clone(), url.clone(), host.clone());
            // not kept alive by a delivery that outlasts its coordinator
            let (signing, scheduler) = (signing.clone(), Arc::downgrade(&scheduler));
            let (sending, delivered) = (sending.clone(), delivered.clone());
            // counted out however the task ends (a panic, an abort)
            let queued = scopeguard::guard(queued.clone(), move |q| {
                q.fetch_sub(1, relaxed);
            });
            tokio::spawn(async move {
                let outcome = match sending.acquire_owned().await {
                    Ok(_slot) => {
                        let to = Receiver {
                            url: &url,
                            host: &host,
                            signing: &signing,
                        };
                        Some(deliver(&client, to, &ended).await)
                    }
                    Err(_) => None,
                };
                drop(queued);
                if let Some(outcome) = outcome {
                    delivered(outcome);
                    // done with: not announced again by the next coordinator
                    if let Some(scheduler) = scheduler.upgrade() {
                        scheduler.announced(&JobId::from(ended.job_id.clone()), ended.finished_ms);
                    }
                }
            });
        }
    }
}

/// The HTTP client notifications are sent with: [`NOTIFY_TIMEOUT`] a try, no redirects followed.
pub(crate) fn http_client() -> reqwest::Result<reqwest::Client> {
    // https:// URLs: rustls with ring, as the S3 store's requests
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(NOTIFY_TIMEOUT)
        // a redirect would turn the POST into a GET without its body, and be counted as delivered
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("stylefarm/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Where a notification goes, and how it is signed.
#[derive(Clone, Copy)]
pub(crate) struct Receiver<'a> {
    pub(crate) url: &'a reqwest::Url,
    /// The URL's host, which the logs name.
    pub(crate) host: &'a str,
    /// The keys that sign the POST, a signature each; none: unsigned.
    pub(crate) signing: &'a [standardwebhooks::Webhook],
}

/// The wait that a receiver's answer asks for before the next try: its `Retry-After` header (RFC 9110
/// 10.2.3: seconds, or an HTTP date), at most [`MAX_RETRY_AFTER`]; `None` without one that reads.
fn retry_after(answer: &reqwest::Response) -> Option<Duration> {
    let value = answer
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => (httpdate::parse_http_date(value).ok()?)
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// POSTs `ended` to the receiver ([the module's docs](self) say how often and with which headers); how it
/// ended.
pub(crate) async fn deliver(
    client: &reqwest::Client,
    to: Receiver<'_>,
    ended: &JobEnded,
) -> Delivered {
    let Receiver { url, host, signing } = to;
    let delivery = ended.delivery();
    let body = match serde_json::to_vec(ended) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, job_id = ended.job_id, "a job-end notification");
            return Delivered::GaveUp;
        }
    };
    let mut backoff = stylefarm_proto::Backoff::default();
    for attempt in 1..=NOTIFY_TRIES {
        let timestamp = now_ms().div_euclid(1000);
        let mut post = client
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("X-Stylefarm-Event", ended.event)
            .header("X-Stylefarm-Delivery", &delivery)
            .header(standardwebhooks::HEADER_WEBHOOK_ID, &delivery)
            .header(standardwebhooks::HEADER_WEBHOOK_TIMESTAMP, timestamp);
        if !signing.is_empty() {
            let signatures: Result<Vec<String>, _> = (signing.iter())
                .map(|key| key.sign(&delivery, timestamp, &body))
                .collect();
            match signatures {
                // one by each key, space-separated (Standard Webhooks' several signatures)
                Ok(signatures) => {
                    let header = signatures.join(" ");
                    post = post.header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, header)
                }
                // only a body that is not UTF-8, which serde_json does not write
                Err(e) => {
                    tracing::error!(error = %e, job_id = ended.job_id, "a job-end notification's signature");
                    return Delivered::GaveUp;
                }
            }
        }
        let sent = post.body(body.clone()).send().await;
        let (why, asked) = match sent {
            Ok(answer) if answer.status().is_redirection() => {
                tracing::error!(
                    job_id = ended.job_id,
                    host,
                    status = answer.status().as_u16(),
                    "the job-end notification was redirected: give --notify-url the receiver's own URL"
                );
                return Delivered::GaveUp;
            }
            Ok(answer) if answer.status().is_success() => {
                tracing::info!(
                    job_id = ended.job_id,
                    state = ended.state,
                    host,
                    "job end announced"
                );
                return Delivered::Delivered;
            }
            Ok(answer)
                if answer.status().is_client_error()
                    && !matches!(answer.status().as_u16(), 408 | 429) =>
            {
                tracing::warn!(
                    job_id = ended.job_id,
                    host,
                    status = answer.status().as_u16(),
                    "the job-end notification was refused; not sent again"
                );
                return Delivered::Refused;
            }
            Ok(answer) => (
                format!("answered {}", answer.status()),
                retry_after(&answer),
            ),
            // reqwest's error names the URL; only its host is logged
            Err(e) => (format!("not answered: {}", e.without_url()), None),
        };
        if attempt < NOTIFY_TRIES {
            let wait = backoff.next_wait().max(asked.unwrap_or_default());
            tracing::warn!(
                job_id = ended.job_id,
                host,
                attempt,
                wait_s = wait.as_secs_f64(),
                error = why,
                "a job-end notification failed; sending it again"
            );
            tokio::time::sleep(wait).await;
        } else {
            tracing::error!(
                job_id = ended.job_id,
                host,
                tries = NOTIFY_TRIES,
                error = why,
                "a job-end notification failed; given up"
            );
        }
    }
    Delivered::GaveUp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notify_url_is_an_http_or_https_url_with_a_host() {
        let url = "https://hooks.example.com/T0/B1/secret"
            .parse::<NotifyConfig>()
            .unwrap()
            .url;
        assert_eq!(url.host_str(), Some("hooks.example.com"));
        for bad in [
            "",
            "hooks.example.com/x",
            "ftp://example.com/",
            "file:///etc/passwd",
        ] {
            let e = bad.parse::<NotifyConfig>().unwrap_err();
            assert!(e.contains("URL"), "{bad}: {e}");
        }
    }

    /// A receiver answering `answers` in turn (then 204) on `/hook`, and how many POSTs it got; its URL.
    async fn receiver(answers: Vec<u16>) -> (reqwest::Url, Arc<std::sync::atomic::AtomicUsize>) {
        let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let got = posts.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || async move {
                let n = got.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let code = answers.get(n).copied().unwrap_or(204);
                let mut answer = axum::response::Response::new(axum::body::Body::empty());
                *answer.status_mut() = http::StatusCode::from_u16(code).unwrap();
                // too many requests: the next try in a second
                if code == 429 {
                    let headers = answer.headers_mut();
                    headers.insert(http::header::RETRY_AFTER, "1".parse().unwrap());
                }
                if code / 100 == 3 {
                    answer
                        .headers_mut()
                        .insert(http::header::LOCATION, "/elsewhere".parse().unwrap());
                }
                answer
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url.parse().unwrap(), posts)
    }

    /// A 4xx answer other than 408 and 429 is a refusal and a redirect is not followed: neither is sent
    /// again; a 429 is, after the second its `Retry-After` asks for, and the next 2xx delivers it.
    #[tokio::test]
    async fn a_refusal_or_a_redirect_ends_a_delivery_and_too_many_requests_does_not() {
        let ended = JobEnded {
            event: "job_ended",
            job_id: "j1".into(),
            name: String::new(),
            tenant: String::new(),
            kind: "single",
            state: "succeeded",
            error: String::new(),
            tasks: 1,
            succeeded: 1,
            failed: 0,
            cancelled: 0,
            submitted_ms: 1,
            finished_ms: 2,
        };
        let client = http_client().unwrap();
        for (answers, outcome, posts) in [
            (vec![410], Delivered::Refused, 1),
            (vec![307], Delivered::GaveUp, 1),
            (vec![301], Delivered::GaveUp, 1),
            (vec![429, 200], Delivered::Delivered, 2),
        ] {
            let (url, got) = receiver(answers.clone()).await;
            let to = Receiver {
                url: &url,
                host: "127.0.0.1",
                signing: &[],
            };
            let started = std::time::Instant::now();
            assert_eq!(deliver(&client, to, &ended).await, outcome, "{answers:?}");
            let got = got.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(got, posts, "{answers:?}");
            if answers[0] == 429 {
                assert!(
                    started.elapsed() >= Duration::from_secs(1),
                    "Retry-After waited"
                );
            }
        }
    }

    /// While the receiver does not answer, at most [`MAX_QUEUED`] notifications are held (being sent or
    /// waiting to be); each job that ends past that is dropped and counted. Both ways the jobs' ends reach
    /// the notifier: one change at a time (the notifier runs between jobs), and all at once, more than its
    /// subscription holds (it lags, and takes the jobs that ended from the scheduler).
    #[tokio::test]
    async fn past_max_queued_waiting_notifications_each_next_one_is_dropped_and_counted() {
        use stylefarm_core::job::{ImageHash, JobKind, JobSpec};
        // a receiver that takes each connection and never answers: every try waits out its timeout
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: reqwest::Url = format!("http://{}/hook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        for one_at_a_time in [true, false] {
            let store = Arc::new(crate::store::MemoryStore::default());
            let config = crate::scheduler::SchedulerConfig {
                announce_ends: true,
                ..Default::default()
            };
            let scheduler = Arc::new(Scheduler::new(config, store).unwrap());
            let counted = Family::<Labels, Counter>::default();
            let config = NotifyConfig {
                url: url.clone(),
                secrets: Vec::new(),
            };
            tokio::spawn(run(scheduler.clone(), config, counted.clone()));
            // (a current-thread runtime: `run` subscribes before its first wait, which this lets it reach)
            tokio::task::yield_now().await;
            let over = 5;
            for _ in 0..MAX_QUEUED + over {
                let spec = JobSpec::new(
                    JobKind::Single,
                    vec![ImageHash::of(b"c")],
                    vec![ImageHash::of(b"s")],
                    Default::default(),
                );
                let (job, _) = scheduler.submit(spec, "").unwrap();
                scheduler.cancel(&job).unwrap();
                if one_at_a_time {
                    tokio::task::yield_now().await;
                }
            }
            let dropped = || {
                counted
                    .get_or_create(&label("outcome", Delivered::Dropped.name()))
                    .get()
            };
            let started = std::time::Instant::now();
            while dropped() < over as u64 && started.elapsed() < Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // a moment more: no other is dropped
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(dropped(), over as u64, "one at a time: {one_at_a_time}");
        }
    }

    /// A signing secret is `whsec_` and the base64 of 24 to 64 bytes; an error says which part is wrong,
    /// never shows the text, and neither does the secret's Debug.
    #[test]
    fn a_signing_secret_is_whsec_and_24_to_64_bytes_of_base64() {
        use base64::Engine as _;
        let of = |n: usize| {
            let bytes: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            )
        };
        for n in [24, 32, 64] {
            let secret = format!(" {}\n", of(n)).parse::<SigningSecret>().unwrap();
            assert_eq!(secret.0.len(), n);
            assert_eq!(format!("{secret:?}"), "SigningSecret(whsec_...)");
        }
        let text = of(32);
        for (bad, why) in [
            (
                text.trim_start_matches("whsec_").to_string(),
                "does not start with whsec_",
            ),
            (format!("{text}!"), "not base64"),
            (of(16), "16 bytes"),
            (of(65), "65 bytes"),
            (String::new(), "does not start with whsec_"),
        ] {
            let e = bad.parse::<SigningSecret>().unwrap_err();
            assert!(e.starts_with(why) && e.contains("head -c 32"), "{bad}: {e}");
            assert!(bad.len() < 10 || !e.contains(&bad[6..]), "{e}");
        }
        // several, for a rotation: one a line or space-separated; a wrong one named by its place
        let (a, b) = (of(32), of(24));
        let both = SigningSecret::list(&format!("{a}\n {b}\n")).unwrap();
        assert_eq!(both.iter().map(|s| s.0.len()).collect::<Vec<_>>(), [32, 24]);
        let e = SigningSecret::list(&format!("{a} {}", of(16))).unwrap_err();
        assert!(e.starts_with("secret 2 of 2: 16 bytes"), "{e}");
        let e = SigningSecret::list(&format!("{a} QUFBQQ==")).unwrap_err();
        assert!(
            e.starts_with("secret 2 of 2 does not start with whsec_"),
            "{e}"
        );
        assert!(e.contains("wrapped") && !e.contains("QUFB"), "{e}");
        assert_eq!(SigningSecret::list(&a).unwrap().len(), 1);
        assert_eq!(SigningSecret::list(" \n").unwrap_err(), "empty");
    }
}
