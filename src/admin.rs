//! The admin server: metrics, health, readiness, token states and reload.

use crate::state::Shared;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Bytes> {
    respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )
}

/// Answers one admin request.
pub async fn handle<B>(
    shared: Arc<Shared>,
    req: Request<B>,
) -> Result<Response<Bytes>, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let reports = shared.token_reports();
            let ready = reports.iter().all(|r| r.ready);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let creds: Vec<_> = reports
                .iter()
                .map(|r| serde_json::json!({"credential": r.credential, "state": r.state, "ready": r.ready}))
                .collect();
            json(
                status,
                &serde_json::json!({"ready": ready, "credentials": creds}),
            )
        }
        (&Method::GET, "/tokens") => {
            let reports = shared.token_reports();
            json(StatusCode::OK, &reports)
        }
        (&Method::POST, "/reload") => {
            let report = shared.reload().await;
            let status = if report.error.is_none() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            json(status, &report)
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/tokens" | "/reload") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method_not_allowed", "message": "GET /metrics /healthz /readyz /tokens, POST /reload"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found", "message": "GET /metrics /healthz /readyz /tokens, POST /reload"}),
        ),
    };
    Ok(resp)
}
