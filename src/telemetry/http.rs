//! The HTTP listener serving `/metrics` (the Prometheus text format) and `/healthz` (the
//! [`Health`] state as text, 200 or 503).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{prometheus, Health};

/// How long open scrapes get to finish once the daemon stops.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A client that opens a connection and sends no request head within this is dropped, so idle
/// sockets cannot pile up.
const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    // `error` rather than `source`: the reason is part of this message, not a cause to chain.
    #[error("cannot listen on {addr} for /metrics and /healthz: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot set up the Prometheus recorder: {0}")]
    Recorder(String),
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there, perhaps a second cache-invalidator: stop it or choose \
             another --metrics-addr / CACHE_INVALIDATOR_METRICS_ADDR)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges the service does not have: choose a port such as 9187)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no network interface of this host has that address: use 127.0.0.1, 0.0.0.0 or one of \
             the host's own addresses)"
        }
        _ => "",
    }
}

/// The running `/metrics` + `/healthz` listener.
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Waits until the listener stopped (after the shutdown token was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Installs the Prometheus recorder, binds `addr` and serves `/metrics` and `/healthz` until
/// `shutdown`. Returns once the port is bound, so a bad address fails the start at once.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<MetricsServer, MetricsError> {
    let handle = prometheus()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| MetricsError::Bind {
            addr,
            hint: bind_hint(&error),
            error,
        })?;
    let local_addr = listener.local_addr().map_err(|error| MetricsError::Bind {
        addr,
        hint: "",
        error,
    })?;
    info!(addr = %local_addr, "serving /metrics and /healthz");
    let task = tokio::spawn(accept_loop(listener, handle, health, shutdown));
    Ok(MetricsServer { task })
}

async fn accept_loop(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    // Tracks every open connection, so stopping waits for scrapes in progress (briefly).
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let handle = handle.clone();
        let health = health.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = respond(request.method(), request.uri().path(), &handle, &health);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP_HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(HTTP_SHUTDOWN_GRACE, connections.shutdown())
        .await
        .is_err()
    {
        debug!("metrics connections still open at shutdown: dropped");
    }
}

/// The response to one request; only the method and path matter.
fn respond(
    method: &Method,
    path: &str,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let readable = method == Method::GET || method == Method::HEAD;
    match path {
        "/metrics" | "/healthz" if !readable => {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n".to_owned(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, handle.render());
            // The Prometheus text exposition format, version 0.0.4.
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" if health.is_healthy() => {
            text(StatusCode::OK, format!("ok: {}\n", health.describe()))
        }
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", health.describe()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this server answers /metrics and /healthz\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_errors_say_what_to_do() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let error = std::net::TcpListener::bind(addr).expect_err("port is taken");
        let message = MetricsError::Bind {
            addr,
            hint: bind_hint(&error),
            error,
        }
        .to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("--metrics-addr"), "{message}");
    }
}
