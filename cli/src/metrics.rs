//! The HTTP endpoint Prometheus scrapes, for the coordinator and the worker: `GET /metrics` on
//! `--metrics-listen` (off unless given; open to whoever reaches the address, as scrape targets usually
//! are: bind it to an address only the monitoring network reaches).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

/// The OpenMetrics text format, which Prometheus negotiates and prometheus-client writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves `text()` on `/metrics` from a task of the current runtime; logs the address
/// bound ("metrics on http://ADDR/metrics", port 0 resolved).
pub(crate) async fn serve(
    addr: SocketAddr,
    text: impl Fn() -> String + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics_listen: binding {addr}"))?;
    let bound = listener.local_addr()?;
    let text = Arc::new(text);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = text.clone();
            async move {
                // a worker's reads its device's memory (NVML), a coordinator's walks its queue: off the
                // async threads
                let body = tokio::task::spawn_blocking(move || text())
                    .await
                    .unwrap_or_else(|e| format!("# the metrics could not be read: {e}\n"));
                ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], body)
            }
        }),
    );
    tracing::info!("metrics on http://{bound}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}
