//! The operator's HTTP endpoint: `/metrics` (the Prometheus families of [`crate::metrics`]),
//! `/healthz` (the process answers) and `/readyz` (the agent serves: listening, not draining,
//! its certificate valid; with what it knows of each peer, from [`crate::metrics::Health`]).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::health::unix_now;
use crate::metrics::Metrics;

/// Scrapes served at once; more connections wait in the listener's backlog. A Prometheus
/// server scrapes one at a time; this leaves room for a few humans with curl.
const MAX_METRICS_CONNECTIONS: usize = 16;
/// A scrape connection is closed after this long, whatever it does: a client that opens one and
/// sends nothing must not keep a descriptor (or a slot) for good.
const METRICS_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut accept = crate::io::accept::AcceptLoop::new("metrics", Some(metrics.clone()));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = accept.accept(|| listener.accept()) => s,
        };
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let metrics = metrics.clone();
            async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = answer(req.uri().path(), metrics);
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Status, content type and body for a request of `path`.
fn answer(path: &str, metrics: &Metrics) -> (StatusCode, &'static str, String) {
    match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        // Alive: the process answers HTTP. Nothing else is checked, so that a liveness probe
        // never restarts an agent that is only draining or waiting for a peer.
        "/healthz" => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".to_string()),
        "/readyz" => {
            let report = metrics.health.report(unix_now());
            let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let mut body = serde_json::to_string_pretty(&report.json).unwrap_or_default();
            body.push('\n');
            (status, "application/json", body)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn readyz_is_503_until_serving_while_draining_and_with_an_expired_certificate() {
        let m = Metrics::new();
        let now = unix_now();
        m.certificates_expire(Some(now + 3600), Some(now + 7200));
        let (status, _, body) = answer("/readyz", &m);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        m.health.serving("127.0.0.1:7443".parse().unwrap());
        m.health.peer_configured("host-b");
        m.health.peer_configured("host-c");
        m.health.peer_dialed("host-b", Some(&"connection refused"));
        m.health.peer_dialed("stranger", None);
        let (status, _, body) = answer("/readyz", &m);
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["certificate"]["valid"], true);
        assert!(v["certificate"]["expires_in_secs"].as_i64().unwrap() > 3500);
        assert_eq!(v["peers"]["host-b"]["reachable"], false);
        assert_eq!(v["peers"]["host-b"]["error"], "connection refused");
        assert!(v["peers"]["host-c"]["reachable"].is_null(), "never tried: {body}");
        assert!(v["peers"].get("stranger").is_none(), "only configured peers: {body}");
        m.health.peers_configured(&["host-b".to_string(), "host-d".to_string()]);
        let v: serde_json::Value = serde_json::from_str(&answer("/readyz", &m).2).unwrap();
        assert_eq!(v["peers"]["host-b"]["reachable"], false, "a kept peer keeps its outcome");
        assert!(v["peers"].get("host-c").is_none() && v["peers"]["host-d"]["reachable"].is_null());
        m.certificates_expire(Some(now - 1), Some(now + 7200));
        let (status, _, body) = answer("/readyz", &m);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("expired"), "{body}");
        m.certificates_expire(Some(now + 3600), Some(now + 7200));
        m.health.starting(Some("waiting for the journal (pid 42)".into()));
        let (status, _, body) = answer("/readyz", &m);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["starting"], "waiting for the journal (pid 42)", "{body}");
        assert_eq!(v["listening"], true, "it serves meanwhile: {body}");
        m.health.starting(None);
        assert_eq!(answer("/readyz", &m).0, StatusCode::OK);
        m.health.draining();
        let (status, _, body) = answer("/readyz", &m);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("draining"), "{body}");
        assert_eq!(answer("/healthz", &m).0, StatusCode::OK);
        assert_eq!(answer("/nothing", &m).0, StatusCode::NOT_FOUND);
    }
}
