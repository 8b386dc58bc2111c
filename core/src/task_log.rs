//! Task logs: the lines a worker logs while it runs a task (what it downloaded, each scale's losses, its
//! checkpoints, the error it failed with), which the coordinator keeps per attempt for the task's owner to
//! read: Flamenco's task log, OpenCue's frame log.
//!
//! The limits here bound both what a worker holds before it sends and what the coordinator keeps of each
//! attempt, whatever a worker sends: a line of at most [`MAX_LINE_BYTES`], at most [`MAX_ATTEMPT_BYTES`] and
//! [`MAX_ATTEMPT_LINES`] lines an attempt (past either, lines after the first [`HEAD_LINES`] are left out,
//! the earliest first, and counted), and the logs of a task's last [`KEPT_ATTEMPTS`] attempts.

use serde::{Deserialize, Serialize};

use crate::ids::WorkerId;

/// The longest line kept, in bytes: a longer one is cut at a character boundary and ends with `…`.
pub const MAX_LINE_BYTES: usize = 1024;
/// The most bytes of lines kept of one attempt (each line counted with its newline).
pub const MAX_ATTEMPT_BYTES: usize = 16 << 10;
/// The most lines kept of one attempt: many short lines take more memory than their bytes.
pub const MAX_ATTEMPT_LINES: usize = 512;
/// The first lines of an attempt, always kept: what the attempt was. The lines left out to keep within
/// [`MAX_ATTEMPT_BYTES`] are the earliest after these, so that how it ended stays.
pub const HEAD_LINES: usize = 8;
/// The attempts whose logs a task keeps: its latest.
pub const KEPT_ATTEMPTS: usize = 3;
/// The most warnings a succeeded task keeps ([`warnings`]): the first.
pub const MAX_WARNINGS: usize = 8;

/// Lines of a log, bounded by [`MAX_LINE_BYTES`], [`MAX_ATTEMPT_BYTES`] and [`MAX_ATTEMPT_LINES`] (see the
/// module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLines {
    /// The lines kept, in the order they were logged, without newlines.
    pub lines: Vec<String>,
    /// How many lines were left out after the first [`HEAD_LINES`], to keep within [`MAX_ATTEMPT_BYTES`] and
    /// [`MAX_ATTEMPT_LINES`].
    #[serde(default)]
    pub left_out: u32,
}

impl LogLines {
    /// The bytes its lines count for against [`MAX_ATTEMPT_BYTES`]: each line's, and its newline.
    pub fn bytes(&self) -> usize {
        self.lines.iter().map(|l| l.len() + 1).sum()
    }

    /// Whether it has no line and left none out.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.left_out == 0
    }

    /// Appends `other`'s lines (each cut to [`MAX_LINE_BYTES`]) and counts its left-out ones, then leaves
    /// out the earliest lines after the first [`HEAD_LINES`] until the rest fit the bounds.
    ///
    /// A log has one run of lines left out, after its first [`HEAD_LINES`] (or after all its lines, when it
    /// has fewer). When `other` has lines left out too, the lines between the two runs (this log's after
    /// its head, `other`'s before its run) are left out with them: the head stays this log's first lines,
    /// and every line kept stays where it was logged.
    pub fn append(&mut self, other: LogLines) {
        self.append_run(Run::of(other));
    }

    /// [`LogLines::append`] of the lines of `other`, a log's lines in the order logged with a run of them
    /// left out.
    fn append_run(&mut self, other: Run) {
        let Run {
            before,
            left_out,
            after,
        } = other;
        if left_out == 0 {
            self.extend(before.into_iter().chain(after));
            return;
        }
        // a head of fewer lines than HEAD_LINES, with nothing left out after it, is followed by `other`'s
        // first lines
        let room = match self.left_out {
            0 => HEAD_LINES.saturating_sub(self.lines.len()),
            _ => 0,
        }
        .min(before.len());
        let between = before.len() - room;
        self.lines
            .extend(before.into_iter().take(room).map(|l| clip_line(&l)));
        let head = HEAD_LINES.min(self.lines.len());
        let between = self.lines.len() - head + between;
        self.lines.truncate(head);
        self.left_out = self
            .left_out
            .saturating_add(u32::try_from(between).unwrap_or(u32::MAX))
            .saturating_add(left_out);
        self.extend(after);
    }

    /// Appends `lines` (each cut to [`MAX_LINE_BYTES`]), then leaves out the earliest lines after the first
    /// [`HEAD_LINES`] until the rest fit [`MAX_ATTEMPT_BYTES`] and [`MAX_ATTEMPT_LINES`].
    pub fn extend<S: AsRef<str>>(&mut self, lines: impl IntoIterator<Item = S>) {
        let mut bytes = self.bytes();
        for line in lines {
            let line = clip_line(line.as_ref());
            bytes += line.len() + 1;
            self.lines.push(line);
            // trimmed now and then, not at every line: a flood of lines costs linear time
            if bytes > 2 * MAX_ATTEMPT_BYTES || self.lines.len() > 2 * MAX_ATTEMPT_LINES {
                bytes = self.trim(bytes);
            }
        }
        self.trim(bytes);
    }

    /// Leaves out the earliest lines after the first [`HEAD_LINES`] while more than [`MAX_ATTEMPT_BYTES`]
    /// (`bytes`, their count) or [`MAX_ATTEMPT_LINES`] are kept; returns the bytes left.
    fn trim(&mut self, mut bytes: usize) -> usize {
        let head = HEAD_LINES.min(self.lines.len());
        let mut end = head;
        while (bytes > MAX_ATTEMPT_BYTES || self.lines.len() - (end - head) > MAX_ATTEMPT_LINES)
            && end < self.lines.len()
        {
            bytes -= self.lines[end].len() + 1;
            end += 1;
        }
        let dropped = end - head;
        if dropped > 0 {
            self.lines.drain(head..end);
            self.left_out = self.left_out.saturating_add(dropped as u32);
        }
        bytes
    }

    /// Takes its lines and its count of those left out, leaving it empty.
    pub fn take(&mut self) -> LogLines {
        std::mem::take(self)
    }
}

/// A log's lines in the order logged: those kept before its run of lines left out, how many, those kept
/// after.
struct Run {
    before: Vec<String>,
    left_out: u32,
    after: Vec<String>,
}

impl Run {
    /// A log's lines: its run of lines left out comes after its first [`HEAD_LINES`] (after all of them,
    /// when it has fewer).
    fn of(mut log: LogLines) -> Run {
        let after = match log.left_out {
            0 => Vec::new(),
            _ => log.lines.split_off(HEAD_LINES.min(log.lines.len())),
        };
        Run {
            before: log.lines,
            left_out: log.left_out,
            after,
        }
    }

    /// Leaves out its first `n` lines, in the order they were logged.
    fn skip(&mut self, n: u64) {
        let before = n.min(self.before.len() as u64) as usize;
        self.before.drain(..before);
        let n = n - before as u64;
        let left_out = n.min(u64::from(self.left_out));
        self.left_out -= left_out as u32;
        let after = (n - left_out).min(self.after.len() as u64) as usize;
        self.after.drain(..after);
    }
}

/// Lines a worker sends for an attempt, with a heartbeat or its report, numbered so that the coordinator
/// keeps each once ([`ReceivedLines`]): a heartbeat that timed out may still have come, and its lines are
/// sent again with the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentLines {
    /// The attempt's number of the first of `lines`: 1 for its first line, the lines left out counted;
    /// 0: not numbered (a worker from before the numbering), kept as they come.
    pub first: u64,
    /// The lines.
    pub lines: LogLines,
}

impl SentLines {
    /// The lines it stands for: those kept and those left out.
    pub fn count(&self) -> u64 {
        self.lines.lines.len() as u64 + u64::from(self.lines.left_out)
    }

    /// Whether it has no line and left none out.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Appends `later`, the lines that follow its own (numbered from where its own end): when it has none,
    /// it starts where `later` does.
    pub fn append(&mut self, later: SentLines) {
        if self.is_empty() {
            self.first = later.first;
        }
        self.lines.append(later.lines);
    }

    /// Takes its lines, leaving it empty and numbered from the next line.
    pub fn take(&mut self) -> SentLines {
        let next = if self.first == 0 {
            0
        } else {
            self.first.saturating_add(self.count())
        };
        std::mem::replace(
            self,
            SentLines {
                first: next,
                lines: LogLines::default(),
            },
        )
    }
}

/// The lines of an attempt that its coordinator has received ([`SentLines`]), each kept once: lines sent
/// again are dropped by their numbers, bounded as [`LogLines`] is.
#[derive(Debug, Clone, Default)]
pub struct ReceivedLines {
    /// The lines kept.
    pub lines: LogLines,
    /// How many numbered lines came: the next one expected is this plus 1.
    count: u64,
}

impl ReceivedLines {
    /// Adds the lines of `sent` that have not come before. Numbered lines past those expected (lines that
    /// never came, from a worker that lost some) count as left out, before `sent`'s lines
    /// ([`LogLines::append`]: the log's one run left out takes them, and the lines between).
    pub fn add(&mut self, sent: SentLines) {
        if sent.first == 0 {
            self.lines.append(sent.lines);
            return;
        }
        let end = (sent.first - 1).saturating_add(sent.count());
        if end <= self.count {
            return;
        }
        let mut lines = Run::of(sent.lines);
        match self.count.checked_sub(sent.first - 1) {
            Some(seen) => lines.skip(seen),
            None => {
                // before the batch's lines: one run left out with its own, the lines between joining it
                let missing = u32::try_from(sent.first - 1 - self.count).unwrap_or(u32::MAX);
                lines = match lines.left_out {
                    0 => Run {
                        before: Vec::new(),
                        left_out: missing,
                        after: lines.before,
                    },
                    left_out => Run {
                        left_out: missing
                            .saturating_add(u32::try_from(lines.before.len()).unwrap_or(u32::MAX))
                            .saturating_add(left_out),
                        before: Vec::new(),
                        after: lines.after,
                    },
                };
            }
        }
        self.count = end;
        self.lines.append_run(lines);
    }
}

/// One attempt at a task, as the coordinator keeps it: its worker, when it ran, how it ended, and the lines
/// its worker logged meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// 1 for the task's first lease, and so on (the task's attempts when it was leased, numbered on across
    /// `stylefarm retry`, which starts the task's attempts over).
    pub attempt: u32,
    /// The worker that ran it.
    pub worker: WorkerId,
    /// When it was leased, in ms since the Unix epoch.
    pub started_ms: i64,
    /// When it ended, in ms since the Unix epoch; 0 while it runs.
    pub ended_ms: i64,
    /// How it ended, for people ("succeeded", "failed: ...", "lease expired (worker lost)"); empty while
    /// it runs.
    pub outcome: String,
    /// Its worker's lines.
    #[serde(default)]
    pub log: LogLines,
}

/// Attempts' logs as text, as `stylefarm log` prints them and the status page serves them: for each, a line
/// `attempt N<TAB>worker<TAB>start (UTC)<TAB>duration or running<TAB>outcome`, then its worker's lines,
/// indented by two spaces, with a line saying how many were left out after the first [`HEAD_LINES`]. No
/// attempt: a line saying so.
pub fn text(attempts: &[AttemptLog]) -> String {
    use std::fmt::Write as _;
    if attempts.is_empty() {
        // not "yet": a task cancelled before it ran never will
        return "no attempt: the task has not run\n".into();
    }
    let mut out = String::new();
    for a in attempts {
        // RFC 3339 ends at 9999-12-31T23:59:59Z
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(a.started_ms.clamp(0, 253_402_300_799_999) as u64);
        let took = match a.ended_ms {
            0 => "running".to_string(),
            end => format!(
                "{:.1} s",
                end.saturating_sub(a.started_ms).max(0) as f64 / 1000.0
            ),
        };
        let _ = writeln!(
            out,
            "attempt {}\t{}\t{}\t{took}\t{}",
            a.attempt,
            a.worker,
            humantime::format_rfc3339_seconds(at),
            a.outcome
        );
        let lines = &a.log.lines;
        let head = lines.len().min(HEAD_LINES);
        for line in &lines[..head] {
            let _ = writeln!(out, "  {line}");
        }
        if a.log.left_out > 0 {
            let _ = writeln!(out, "  … {} lines left out …", a.log.left_out);
        }
        for line in &lines[head..] {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// `line` with at most [`MAX_LINE_BYTES`] bytes: a longer one is cut at a character boundary and ends with
/// `…`; newlines and other control characters become spaces, so that one line stays one line.
pub fn clip_line(line: &str) -> String {
    const ELLIPSIS: &str = "…";
    let clean = |s: &str| s.replace(|c: char| c.is_control(), " ");
    if line.len() <= MAX_LINE_BYTES {
        return clean(line);
    }
    clean(at_most(line, MAX_LINE_BYTES - ELLIPSIS.len())) + ELLIPSIS
}

/// A succeeded task's warnings, as a worker sends them and the coordinator keeps them, whatever the worker
/// sent: what its engine warned of while it rendered the result (`pb::TaskStatus::warnings`), each cut as
/// a log line is ([`clip_line`]), without repeats, the first [`MAX_WARNINGS`] of them.
pub fn warnings<S: AsRef<str>>(sent: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for warning in sent {
        if kept.len() == MAX_WARNINGS {
            break;
        }
        let warning = clip_line(warning.as_ref()).trim().to_string();
        if !warning.is_empty() && !kept.contains(&warning) {
            kept.push(warning);
        }
    }
    kept
}

/// The longest start of `text` of at most `bytes` bytes that ends at a character boundary.
pub fn at_most(text: &str, bytes: usize) -> &str {
    &text[..text.floor_char_boundary(bytes)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_keeps_its_first_warnings_once_each_and_cut_as_log_lines() {
        let long = "w".repeat(2 * MAX_LINE_BYTES);
        let sent = [" a ", "", "a", "b\nc", &long]
            .into_iter()
            .map(String::from)
            .chain((0..20).map(|i| format!("w{i}")));
        let kept = warnings(sent);
        assert_eq!(kept.len(), MAX_WARNINGS);
        assert_eq!(&kept[..3], ["a", "b c", &clip_line(&long)]);
        assert_eq!(kept[3..], ["w0", "w1", "w2", "w3", "w4"]);
        assert!(kept[2].len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn a_long_line_is_cut_at_a_character_boundary_and_control_characters_become_spaces() {
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = clip_line(&long);
        assert!(cut.len() <= MAX_LINE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(clip_line("a\nb\tc"), "a b c");
        assert_eq!(clip_line("short"), "short");
    }

    #[test]
    fn past_its_bytes_a_log_keeps_its_head_and_its_latest_lines_and_counts_the_rest() {
        let mut log = LogLines::default();
        let lines: Vec<String> = (0..10_000)
            .map(|i| format!("line {i:05} {}", "x".repeat(90)))
            .collect();
        log.extend(&lines[..5_000]);
        log.append(LogLines {
            lines: lines[5_000..].to_vec(),
            left_out: 7,
        });
        assert!(log.bytes() <= MAX_ATTEMPT_BYTES, "{}", log.bytes());
        // many short lines: bounded by their number
        let mut short = LogLines::default();
        short.extend((0..10_000).map(|i| i.to_string()));
        assert_eq!(short.lines.len(), MAX_ATTEMPT_LINES);
        assert_eq!(short.left_out as usize, 10_000 - MAX_ATTEMPT_LINES);
        assert_eq!(short.lines.last().map(String::as_str), Some("9999"));
        assert_eq!(log.lines[..HEAD_LINES], lines[..HEAD_LINES]);
        assert_eq!(log.lines.last(), lines.last());
        let kept = log.lines.len();
        // every line is either kept or counted
        assert_eq!(kept + log.left_out as usize, 10_000 + 7);
        // the kept tail is contiguous: the latest lines
        let tail = &log.lines[HEAD_LINES..];
        assert_eq!(tail, &lines[10_000 - tail.len()..]);
    }

    #[test]
    fn attempts_as_text_say_who_when_how_long_and_how_they_ended() {
        let attempt = |attempt, ended_ms, outcome: &str, left_out| AttemptLog {
            attempt,
            worker: WorkerId::from("w#1"),
            started_ms: 1_764_912_000_000,
            ended_ms,
            outcome: outcome.into(),
            log: LogLines {
                lines: (0..HEAD_LINES + 1).map(|i| format!("line {i}")).collect(),
                left_out,
            },
        };
        let text = text(&[
            attempt(1, 1_764_912_002_500, "failed: boom", 3),
            attempt(2, 0, "", 0),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "attempt 1\tw#1\t2025-12-05T05:20:00Z\t2.5 s\tfailed: boom"
        );
        assert_eq!(lines[1], "  line 0");
        assert_eq!(lines[HEAD_LINES + 1], "  … 3 lines left out …");
        assert_eq!(lines[HEAD_LINES + 2], format!("  line {HEAD_LINES}"));
        assert_eq!(
            lines[HEAD_LINES + 3],
            "attempt 2\tw#1\t2025-12-05T05:20:00Z\trunning\t"
        );
        assert_eq!(lines.len(), 2 * (HEAD_LINES + 2) + 1);
        assert_eq!(super::text(&[]), "no attempt: the task has not run\n");
        // times from a coordinator, however wrong, are text: no overflow
        for (started_ms, ended_ms) in [(i64::MAX, -1), (i64::MIN, i64::MAX), (-5, 1)] {
            let odd = AttemptLog {
                started_ms,
                ended_ms,
                ..attempt(3, 0, "", 0)
            };
            let text = super::text(&[odd]);
            let first = text.lines().next().unwrap();
            assert_eq!(first.split('\t').count(), 5, "{first}");
            assert!(first.starts_with("attempt 3\tw#1\t"), "{first}");
        }
    }

    /// Lines sent again (a heartbeat that timed out after it came) are kept once, by their numbers; lines
    /// not numbered are kept as they come.
    #[test]
    fn lines_sent_again_are_kept_once() {
        let sent = |first, lines: &[&str], left_out| SentLines {
            first,
            lines: LogLines {
                lines: lines.iter().map(|l| l.to_string()).collect(),
                left_out,
            },
        };
        let mut got = ReceivedLines::default();
        got.add(sent(1, &["a", "b"], 0));
        // the beat timed out after it came: its lines again, with a newer one
        got.add(sent(1, &["a", "b", "c"], 0));
        // a beat that came late, after the one that sent its lines again
        got.add(sent(3, &["c"], 0));
        got.add(sent(4, &["d"], 0));
        assert_eq!(got.lines.lines, ["a", "b", "c", "d"]);
        assert_eq!(got.lines.left_out, 0);
        // lines that never came count as left out
        got.add(sent(7, &["g"], 0));
        assert_eq!(
            (got.lines.lines.last().unwrap().as_str(), got.lines.left_out),
            ("g", 2)
        );
        // past the head, lines that never came are left out where they were: before the batch's lines,
        // with the lines kept between (9 and 10 here)
        let mut got = ReceivedLines::default();
        let ten: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
        got.add(sent(
            1,
            &ten.iter().map(String::as_str).collect::<Vec<_>>(),
            0,
        ));
        got.add(sent(14, &["14"], 0));
        assert_eq!(got.lines.lines[..HEAD_LINES], ten[..HEAD_LINES]);
        assert_eq!(
            (&got.lines.lines[HEAD_LINES..], got.lines.left_out),
            (&["14".to_string()][..], 5)
        );
        // a batch with lines left out after its head: those seen skipped in the order logged
        let mut got = ReceivedLines::default();
        let head: Vec<String> = (1..=HEAD_LINES).map(|i| i.to_string()).collect();
        got.add(sent(1, &["1", "2", "3"], 0));
        let mut again: Vec<&str> = head.iter().map(String::as_str).collect();
        again.push("last");
        // lines 1..=8 kept, 9..=12 left out, 13 ("last") kept
        got.add(sent(1, &again, 4));
        assert_eq!(got.lines.lines.len(), HEAD_LINES + 1);
        assert_eq!(got.lines.left_out, 4);
        assert_eq!(got.lines.lines[..3], ["1", "2", "3"]);
        assert_eq!(got.lines.lines[3], "4");
        // past the head: the lines left out that came are not counted twice; those kept between the log's
        // head and the batch's run left out (9 and 10) are left out with it, the log's one run
        let mut got = ReceivedLines::default();
        let ten: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
        got.add(sent(
            1,
            &ten.iter().map(String::as_str).collect::<Vec<_>>(),
            0,
        ));
        got.add(sent(1, &again, 4));
        assert_eq!(got.lines.lines.len(), HEAD_LINES + 1, "{:?}", got.lines);
        assert_eq!(
            (got.lines.lines[HEAD_LINES].as_str(), got.lines.left_out),
            ("last", 4)
        );
        // not numbered: as they come
        let mut got = ReceivedLines::default();
        got.add(sent(0, &["x"], 0));
        got.add(sent(0, &["x"], 0));
        assert_eq!(got.lines.lines, ["x", "x"]);
        // numbers near the end of u64 do not overflow
        got.add(sent(u64::MAX, &["y", "z"], u32::MAX));
        got.add(sent(u64::MAX, &["y"], 0));
    }

    /// A worker's unsent lines: taken with their number, and put back before the newer ones.
    #[test]
    fn sent_lines_are_numbered_from_where_the_last_taken_ended() {
        let mut log = SentLines {
            first: 1,
            ..SentLines::default()
        };
        log.lines.extend(["a", "b"]);
        let taken = log.take();
        assert_eq!((taken.first, taken.count(), log.first), (1, 2, 3));
        log.lines.extend(["c"]);
        // put back: before the newer lines, numbered from its own first
        let mut back = taken;
        back.append(log.take());
        assert_eq!((back.first, back.lines.lines.len()), (1, 3));
        let mut empty = SentLines::default();
        empty.append(back);
        assert_eq!(empty.first, 1);
    }

    /// What a worker's beat did with the lines it carried.
    #[derive(Debug, Clone, Copy)]
    enum Beat {
        /// They came, and the worker heard so.
        Came,
        /// They did not come: the worker sends them again with its next lines.
        Lost,
        /// They came, but the answer was lost: the worker sends them again.
        AnswerLost,
        /// They come later, after the worker sent them again (a slow beat).
        Late,
    }

    /// The number a line of [`a_worker_s_lines_over_a_lossy_network`] starts with.
    fn number(line: &str) -> u64 {
        line[..7].parse().unwrap()
    }

    proptest::proptest! {
        /// Whatever the network does to a worker's beats (lost, their answer lost, late) and however many
        /// lines it logs between them (batches trimmed on the worker, several of them merged when sent
        /// again), the coordinator keeps every line once: the attempt's first lines, then one run left out,
        /// then its latest, each where it was logged, and the count of all of them.
        #[test]
        fn a_worker_s_lines_over_a_lossy_network(
            steps in proptest::collection::vec(
                (0usize..120, 0usize..700, proptest::sample::select(vec![
                    Beat::Came, Beat::Lost, Beat::AnswerLost, Beat::Late,
                ])),
                1..40,
            ),
        ) {
            let mut worker = SentLines { first: 1, ..SentLines::default() };
            let mut coordinator = ReceivedLines::default();
            let mut late = Vec::new();
            let mut logged = 0u64;
            // what the worker's TaskLog does with lines not heard of: before its newer ones
            let put_back = |sent: SentLines, worker: &mut SentLines| {
                let mut back = sent;
                back.append(worker.take());
                *worker = back;
            };
            for (k, (lines, width, beat)) in steps.into_iter().enumerate() {
                let batch: Vec<String> = (0..lines)
                    .map(|i| format!("{:07} {}", logged + 1 + i as u64, "x".repeat((width * (i + 1)) % 700)))
                    .collect();
                logged += lines as u64;
                worker.lines.extend(batch);
                let sent = worker.take();
                match beat {
                    Beat::Came => coordinator.add(sent),
                    Beat::Lost => put_back(sent, &mut worker),
                    Beat::AnswerLost => {
                        coordinator.add(sent.clone());
                        put_back(sent, &mut worker);
                    }
                    Beat::Late => {
                        late.push(sent.clone());
                        put_back(sent, &mut worker);
                    }
                }
                if k % 3 == 2 {
                    if let Some(sent) = late.pop() {
                        coordinator.add(sent);
                    }
                }
            }
            // the report carries the rest; the late beats come after it
            coordinator.add(worker.take());
            for sent in late {
                coordinator.add(sent);
            }
            let log = coordinator.lines;
            proptest::prop_assert!(log.bytes() <= MAX_ATTEMPT_BYTES);
            proptest::prop_assert!(log.lines.len() <= MAX_ATTEMPT_LINES);
            proptest::prop_assert_eq!(log.lines.len() as u64 + u64::from(log.left_out), logged);
            let head = if log.left_out > 0 { HEAD_LINES.min(log.lines.len()) } else { log.lines.len() };
            let numbers: Vec<u64> = log.lines.iter().map(|l| number(l)).collect();
            for (i, &n) in numbers.iter().enumerate() {
                let expected = if i < head {
                    i as u64 + 1
                } else {
                    i as u64 + 1 + u64::from(log.left_out)
                };
                proptest::prop_assert_eq!(n, expected, "line {} of {:?}", i, numbers);
            }
        }
    }

    #[test]
    fn a_log_within_its_bytes_keeps_every_line() {
        let mut log = LogLines::default();
        log.extend(["a", "b"]);
        log.extend(vec!["c".to_string()]);
        assert_eq!(log.lines, ["a", "b", "c"]);
        assert_eq!(log.left_out, 0);
        assert_eq!(log.take().lines.len(), 3);
        assert!(log.is_empty());
    }
}
