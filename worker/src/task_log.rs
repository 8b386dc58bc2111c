//! A task's log on the worker: the events logged while the worker runs a task (in its [`TASK_SPAN`] span,
//! on the async threads and on the engine thread), as lines, which the worker sends the coordinator with
//! the task's heartbeats and its outcome ([`stylefarm_core::task_log`]; `stylefarm log JOB TASK` shows
//! them), and the engine's warnings, which go with its result (`pb::TaskStatus::warnings`).
//!
//! [`TaskLogLayer`] is a `tracing_subscriber` layer that the process installs with its other logs, with a
//! filter of its own ([`TaskLogLayer::filter`]: stylefarm's events at INFO and above, whatever the logs
//! on stderr show); without it, a task's log holds only what the coordinator records of each attempt.

use std::sync::{Arc, Mutex};

use stylefarm_core::task_log::{LogLines, SentLines};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Span, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The name of the span the worker runs each task in: its events go to the task's log.
pub const TASK_SPAN: &str = "task";

/// The lines logged in one task's span and not sent yet, bounded as an attempt's log is
/// ([`stylefarm_core::task_log::MAX_ATTEMPT_BYTES`]), and the turn to send them.
///
/// The coordinator keeps a heartbeat's lines only while the lease is held, and the report ends the lease:
/// lines a heartbeat took must have come before the report goes, or they are lost. So a heartbeat takes its
/// lines with the turn ([`TaskLog::take_for_beat`]) and holds it until they came or were put back, and the
/// report waits for the turn and keeps it ([`TaskLog::last_turn`]): heartbeats then carry no lines, the
/// report sends them all.
///
/// Lines are numbered ([`SentLines`]): a beat that timed out may still have come, and the coordinator keeps
/// lines sent again once.
#[derive(Clone)]
pub struct TaskLog {
    lines: Arc<Mutex<SentLines>>,
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The engine's warnings so far ([`TaskLog::warnings`]).
    warnings: Arc<Mutex<Vec<String>>>,
}

impl Default for TaskLog {
    fn default() -> Self {
        TaskLog {
            lines: Arc::new(Mutex::new(SentLines {
                first: 1,
                lines: LogLines::default(),
            })),
            turn: Arc::default(),
            warnings: Arc::default(),
        }
    }
}

/// Lines a heartbeat took from a task's log ([`TaskLog::take_for_beat`]), with the log's turn to send: the
/// task's report waits until this is dropped, or its lines put back ([`Sending::not_sent`]).
pub struct Sending {
    /// The lines, to send.
    pub lines: SentLines,
    log: TaskLog,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Sending {
    /// Puts the lines back, before those logged since: they did not come (the beat failed or timed out),
    /// and go with the next beat or the report.
    pub fn not_sent(self) {
        self.log.put_back(self.lines);
    }
}

impl TaskLog {
    /// The log of `span` (a [`TASK_SPAN`] span): `None` where no [`TaskLogLayer`] is installed, or the
    /// span is disabled by the log filter.
    pub fn of(span: &Span) -> Option<TaskLog> {
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            let log = span.extensions().get::<TaskLog>().cloned();
            log
        })
        .flatten()
    }

    /// Takes the lines not sent yet. The task's report takes them while it holds the turn
    /// ([`TaskLog::last_turn`]).
    pub fn take(&self) -> SentLines {
        self.lock().take()
    }

    /// For a heartbeat: the lines not sent yet, with the turn to send them; `None` when there are none, or
    /// when the report has the turn (the beat then goes without lines).
    pub fn take_for_beat(&self) -> Option<Sending> {
        let turn = self.turn.clone().try_lock_owned().ok()?;
        let lines = self.take();
        (!lines.is_empty()).then(|| Sending {
            lines,
            log: self.clone(),
            _turn: turn,
        })
    }

    /// For the task's report: waits until no heartbeat's lines are on their way (at most one beat), and
    /// keeps later beats from taking any until the returned turn is dropped. The report sends the lines
    /// itself meanwhile ([`TaskLog::take`]).
    pub async fn last_turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }

    /// What the engine warned of in the task's span so far (its crate's WARN events, [`ENGINE_TARGET`]):
    /// the result's warnings, which go with it ([`stylefarm_core::task_log::warnings`]: the first, once
    /// each).
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn warn(&self, warning: String) {
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        let kept = stylefarm_core::task_log::warnings(warnings.iter().chain([&warning]));
        *warnings = kept;
    }

    /// Puts back `lines` that could not be sent, before those logged since.
    fn put_back(&self, mut lines: SentLines) {
        let mut log = self.lock();
        lines.append(log.take());
        *log = lines;
    }

    fn push(&self, line: String) {
        self.lock().lines.extend([line]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SentLines> {
        // a panic while the lock was held left lines, not broken ones
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The target (the crate) whose WARN events in a task's span are the result's warnings: the engine's, which
/// warns of what it rendered (a scale that ended worse than it began, a checkpoint that did not fit); the
/// worker's own (a heartbeat that failed) are of how the task ran, and only go to its log.
pub const ENGINE_TARGET: &str = "stylefarm_engine";

/// Writes the events of each [`TASK_SPAN`] span of this crate, and of the spans within it, into the span's
/// [`TaskLog`], one line each: UTC time, level, message and fields (`2026-12-05T05:30:01.123456Z INFO
/// rendered engine_s=1.5`); the engine's warnings ([`ENGINE_TARGET`]) also as the task's warnings, message
/// and fields ([`TaskLog::warnings`]).
pub struct TaskLogLayer;

impl TaskLogLayer {
    /// What goes to a task's log: the events (and spans) of stylefarm's crates at INFO and above, not
    /// those of its libraries (tonic, h2), whatever `STYLEFARM_LOG` sets for the logs on stderr. The layer
    /// is installed with it as its own filter (`TaskLogLayer.with_filter(TaskLogLayer::filter())`).
    pub fn filter() -> tracing_subscriber::filter::Targets {
        tracing_subscriber::filter::Targets::new().with_target("stylefarm", tracing::Level::INFO)
    }
}

impl<S> Layer<S> for TaskLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let meta = attrs.metadata();
        if meta.name() == TASK_SPAN && meta.target().starts_with(env!("CARGO_CRATE_NAME")) {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(TaskLog::default());
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        // the log taken out of the span's extensions before the line is made
        let log = scope
            .into_iter()
            .find_map(|span| span.extensions().get::<TaskLog>().cloned());
        if let Some(log) = log {
            let meta = event.metadata();
            let text = text(event);
            if *meta.level() == tracing::Level::WARN
                && meta.target().split("::").next() == Some(ENGINE_TARGET)
            {
                log.warn(text.clone());
            }
            log.push(line(meta.level(), &text));
        }
    }
}

/// An event's `text` ([`text`]) as one line of a task's log: the time, its `level`, and it.
fn line(level: &tracing::Level, text: &str) -> String {
    let mut line = String::new();
    // the time as tracing_subscriber's text logs write it (RFC 3339, UTC)
    if SystemTime.format_time(&mut Writer::new(&mut line)).is_err() {
        line.clear();
    }
    line.push(' ');
    line.push_str(level.as_str());
    if !text.is_empty() {
        line.push(' ');
        line.push_str(text);
    }
    line
}

/// An event's message and its other fields (`rendered engine_s=1.5`).
fn text(event: &Event<'_>) -> String {
    let mut fields = Fields {
        message: String::new(),
        rest: String::new(),
    };
    event.record(&mut fields);
    let mut text = fields.message;
    if text.is_empty() {
        text = fields.rest.trim_start().to_string();
    } else {
        text.push_str(&fields.rest);
    }
    text
}

/// An event's message, and its other fields as ` name=value`.
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push_str(&format!(" {}={value}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message.push_str(&format!("{value:?}"));
        } else {
            self.rest.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::prelude::*;

    use super::*;

    #[test]
    fn a_task_span_s_events_and_only_they_go_to_its_log() {
        // as the command installs it: with its filter, beside logs that show warnings only
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_filter(tracing::level_filters::LevelFilter::WARN),
            )
            .with(TaskLogLayer.with_filter(TaskLogLayer::filter()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before any task");
            let span = tracing::info_span!(TASK_SPAN, job_id = "job-1");
            let log = TaskLog::of(&span).expect("the task span has a log");
            span.in_scope(|| {
                tracing::info!(label = "content 1 x style 1", "rendering");
                // not stylefarm's, or below INFO: left out
                tracing::info!(target: "h2", "frame");
                tracing::debug!("detail");
                let inner = tracing::info_span!("download");
                inner.in_scope(|| tracing::warn!(bytes = 12, "slow"));
                // the engine's warnings are the result's too (the worker's, as "slow", are not)
                tracing::warn!(target: "stylefarm_engine::render", scale = 1, "worse");
                tracing::warn!(target: "stylefarm_engine::render", scale = 1, "worse");
                tracing::info!(target: "stylefarm_engine::render", "fine");
                tracing::warn!(target: "stylefarm_engine_other", "another crate");
            });
            // from another thread (as the engine thread), in the span
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            std::thread::scope(|s| {
                s.spawn(|| {
                    tracing::dispatcher::with_default(&dispatch, || {
                        let _entered = span.enter();
                        tracing::info!(engine_s = 1.5, "rendered");
                    })
                });
            });
            tracing::info!("after the task");
            assert_eq!(log.warnings(), ["worse scale=1"]);
            let lines: Vec<_> = (log.take().lines.lines.into_iter())
                .filter(|l| !l.contains("worse") && !l.contains("fine") && !l.contains("other"))
                .collect();
            assert_eq!(lines.len(), 3, "{lines:?}");
            assert!(
                lines[0].ends_with(" INFO rendering label=content 1 x style 1"),
                "{}",
                lines[0]
            );
            assert!(lines[1].ends_with(" WARN slow bytes=12"), "{}", lines[1]);
            assert!(
                lines[2].ends_with(" INFO rendered engine_s=1.5"),
                "{}",
                lines[2]
            );
            // each line starts with its UTC time
            assert!(
                lines[0].starts_with("20") && lines[0].contains('T'),
                "{}",
                lines[0]
            );
            assert!(log.take().is_empty());
            // lines that could not be sent go back before the newer ones, numbered from their own first
            span.in_scope(|| tracing::info!("newer"));
            log.put_back(SentLines {
                first: 3,
                lines: LogLines {
                    lines: vec!["older".into()],
                    left_out: 0,
                },
            });
            let taken = log.take();
            assert_eq!(taken.first, 3);
            let lines = taken.lines.lines;
            assert_eq!(lines[0], "older");
            assert!(lines[1].ends_with("newer"), "{}", lines[1]);
        });
    }

    #[tokio::test]
    async fn the_report_waits_for_a_beat_s_lines_and_beats_then_carry_none() {
        let log = TaskLog::default();
        log.push("first".into());
        let beat = log.take_for_beat().expect("a beat takes the lines");
        assert_eq!(
            (beat.lines.first, &beat.lines.lines.lines[..]),
            (1, &["first".to_string()][..])
        );
        // none left: the next beat carries no lines, and holds no turn
        assert!(log.take_for_beat().is_none());
        // the report waits while the beat's lines are on their way
        let report = tokio::spawn({
            let log = log.clone();
            async move {
                let turn = log.last_turn().await;
                (turn, log.take())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!report.is_finished());
        log.push("second".into());
        // the beat failed: its lines go back, before the newer one, and the report takes them all
        beat.not_sent();
        let (turn, lines) = report.await.unwrap();
        assert_eq!(
            (lines.first, &lines.lines.lines[..]),
            (1, &["first".to_string(), "second".into()][..])
        );
        // while the report holds the turn, beats take nothing
        log.push("third".into());
        assert!(log.take_for_beat().is_none());
        let third = log.take();
        assert_eq!(
            (third.first, &third.lines.lines[..]),
            (3, &["third".to_string()][..])
        );
        drop(turn);
        log.push("fourth".into());
        assert_eq!(log.take_for_beat().map(|s| s.lines.first), Some(4));
    }

    #[test]
    fn without_the_layer_a_task_has_no_log() {
        let subscriber = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(TASK_SPAN);
            assert!(TaskLog::of(&span).is_none());
        });
    }
}
