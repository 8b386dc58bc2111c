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
//! closed, so that silent sockets do not hold the places.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
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

/// The connections `listener` accepts, at most `limit` of them open at once (see the module's doc), for
/// tonic's `serve_with_incoming`, counted in `metrics`. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limit: usize,
    metrics: ConnectionMetrics,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(1);
    let places = Arc::new(Semaphore::new(limit));
    tokio::spawn(async move {
        let mut refused = 0u64;
        let mut warned: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
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
            let Ok(place) = places.clone().try_acquire_owned() else {
                // closed at once (dropped): its client sees the connection reset and fails fast
                refused += 1;
                metrics.refused.inc();
                if warned.is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL) {
                    tracing::warn!(
                        refused,
                        max_connections = limit,
                        peer = ?stream.peer_addr().ok(),
                        "connections refused: as many are open as --max-connections allows"
                    );
                    warned = Some(Instant::now());
                    refused = 0;
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            metrics.open.inc();
            let connection = Connection {
                stream,
                _place: place,
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
