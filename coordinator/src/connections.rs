//! The coordinator's gRPC listener, with a bound on the connections open at once.
//!
//! Each connection holds a file descriptor and up to [`crate::MAX_CONCURRENT_STREAMS`] calls. Without a
//! bound, a flood of connections would use up the process's descriptors, and with them the coordinator's own:
//! the job store's file, the blob store's files and connections, Redis. So at most
//! [`CoordinatorConfig::max_connections`](crate::CoordinatorConfig::max_connections) are served at once
//! (lowered to fit the open-files limit, raised first as far as that needs, up to the hard limit); one more
//! is accepted and closed at once, so that its client fails fast (gRPC UNAVAILABLE) rather than waiting, and
//! a warning says so (at most one every [`REFUSED_LOG_INTERVAL`], with the count). An error of `accept` that
//! is not the one connection's (out of descriptors, say) pauses accepting for [`ACCEPT_ERROR_PAUSE`] instead
//! of retrying in a busy loop. A connection whose client sends nothing within [`FIRST_BYTES_TIMEOUT`] is
//! closed, so that silent sockets do not hold the places. With
//! [`CoordinatorConfig::max_connections_per_source`](crate::CoordinatorConfig::max_connections_per_source),
//! one IP address holds at most that many of the places: more from it are closed the same way, while other
//! hosts are still served.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// [`CoordinatorConfig::max_connections`](crate::CoordinatorConfig::max_connections) unless configured:
/// a farm of a few thousand workers and its clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// File descriptors kept for the coordinator's own use (store, blobs, Redis, the status page, logs) when
/// the open-files limit bounds the connections.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// The longest pause of the accept loop after an error that is not the one connection's.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// The least time between two warnings about refused connections.
pub const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connections that may be open at once: `wanted`, or fewer where the open-files limit (raised to its
/// hard limit as far as `wanted` needs) leaves less than `wanted` + [`RESERVED_DESCRIPTORS`]; at least 1.
pub fn connection_limit(wanted: usize) -> usize {
    let need = wanted as u64 + RESERVED_DESCRIPTORS;
    match rlimit::increase_nofile_limit(need) {
        Ok(files) if files < need => {
            let fits = files.saturating_sub(RESERVED_DESCRIPTORS).max(1) as usize;
            tracing::warn!(
                max_connections = wanted,
                open_files_limit = files,
                serving = fits,
                "the open-files limit (ulimit -n) leaves room for fewer connections than --max-connections"
            );
            fits
        }
        Ok(_) => wanted,
        Err(e) => {
            tracing::warn!(error = %e, "reading the open-files limit failed; --max-connections as given");
            wanted
        }
    }
}

/// The connections' metrics ([`crate::metrics`]): those open now, and those refused.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// gRPC connections served now.
    pub open: Gauge,
    /// Connections closed as they came, past the bound.
    pub refused: Counter,
}

/// How long a new connection may stay silent: one whose client sends nothing (not the HTTP/2 preface,
/// not a TLS hello) within it is closed, and its place given back.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// A served connection: the TCP stream and its place among the [`connection_limit`] ones, given back
/// when the connection is dropped (closed by either side, or silent past [`FIRST_BYTES_TIMEOUT`]).
pub struct Connection {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    /// Its place among its address's, under a bound per source.
    _source: Option<SourcePlace>,
    open: Gauge,
    /// Until the client's first bytes: when the connection is closed if they have not come.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = this.first_bytes.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client sent nothing within {FIRST_BYTES_TIMEOUT:?}"),
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections open per IP address, under a bound per source.
type Sources = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One of an address's places under a bound per source, given back when dropped.
struct SourcePlace {
    sources: Sources,
    ip: IpAddr,
}

impl SourcePlace {
    /// A place for `ip` when it holds fewer than `bound`.
    fn take(sources: &Sources, ip: IpAddr, bound: usize) -> Option<SourcePlace> {
        let mut open = sources.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= bound {
            return None;
        }
        *n += 1;
        Some(SourcePlace {
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut open = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The refused connections since the last warning, which comes at most every [`REFUSED_LOG_INTERVAL`].
#[derive(Default)]
struct Refusals {
    since_warned: u64,
    warned: Option<Instant>,
}

impl Refusals {
    /// Counts a connection from `peer` closed as it came, past `bound` (the flag's name and value), and
    /// warns when it is time.
    fn refused(&mut self, metrics: &ConnectionMetrics, peer: IpAddr, bound: (&str, usize)) {
        self.since_warned += 1;
        metrics.refused.inc();
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL)
        {
            let (flag, value) = bound;
            tracing::warn!(
                refused = self.since_warned,
                %peer,
                "connections refused: as many are open as {flag} {value} allows"
            );
            self.warned = Some(Instant::now());
            self.since_warned = 0;
        }
    }
}

/// Whether an error of `accept` concerns only the connection being accepted (it went away first), so
/// that the next may be accepted at once.
fn one_connection_s(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The connections `listener` accepts, at most `limit` of them open at once and, with `per_source`, at
/// most that many from one IP address (see the module's doc), for tonic's `serve_with_incoming`, counted
/// in `metrics`. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limit: usize,
    per_source: Option<usize>,
    metrics: ConnectionMetrics,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(1);
    let places = Arc::new(Semaphore::new(limit));
    let sources = Sources::default();
    tokio::spawn(async move {
        let mut refusals = Refusals::default();
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok((stream, peer)) => (stream, peer.ip().to_canonical()),
                Err(e) if one_connection_s(&e) => continue,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        pause_s = ACCEPT_ERROR_PAUSE.as_secs_f64(),
                        "accepting a connection failed"
                    );
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // a refused connection is closed at once (dropped): its client sees it reset and fails fast
            let source = match per_source {
                Some(bound) => match SourcePlace::take(&sources, peer, bound) {
                    Some(place) => Some(place),
                    None => {
                        refusals.refused(&metrics, peer, ("--max-connections-per-source", bound));
                        continue;
                    }
                },
                None => None,
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                refusals.refused(&metrics, peer, ("--max-connections", limit));
                continue;
            };
            let _ = stream.set_nodelay(true);
            metrics.open.inc();
            let connection = Connection {
                stream,
                _place: place,
                _source: source,
                open: metrics.open.clone(),
                first_bytes: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))),
            };
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address holds at most its bound of places; one given back is its again, and an address with
    /// none open is not kept.
    #[test]
    fn a_source_holds_at_most_its_bound_of_places() {
        let sources = Sources::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = SourcePlace::take(&sources, a, 2).unwrap();
        let second = SourcePlace::take(&sources, a, 2).unwrap();
        assert!(SourcePlace::take(&sources, a, 2).is_none());
        let other = SourcePlace::take(&sources, b, 2).unwrap();
        drop(first);
        let third = SourcePlace::take(&sources, a, 2).unwrap();
        drop((second, third, other));
        assert!(sources.lock().unwrap().is_empty());
    }

    /// A bound that fits the open-files limit is kept; one that does not is lowered to the limit (raised
    /// first as far as it may go) less the descriptors kept for the coordinator's own use.
    #[test]
    fn the_bound_fits_the_open_files_limit() {
        assert_eq!(connection_limit(10), 10);
        let (before, _) = rlimit::Resource::NOFILE.get().unwrap();
        let served = connection_limit(1usize << 40);
        let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
        assert!(
            before <= soft && soft <= hard,
            "{before} -> {soft} (hard {hard})"
        );
        assert_eq!(served as u64, soft - RESERVED_DESCRIPTORS);
    }
}
