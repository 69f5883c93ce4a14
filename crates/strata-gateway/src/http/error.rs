//! How what went wrong below the routes becomes an answer: store failures
//! as OpenAI-shaped errors with the right status (the one place they are
//! mapped), and the raw JSON or event-stream answers relayed from replicas.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use strata_core::store::StoreError;
use strata_core::ApiError;

/// A store failure as the client hears it: a database that is away or a
/// full disk is a 503 worth retrying, a conflict a 409, anything else a 500.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(what) => ApiError::conflict(format!("{what} already exists.")),
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "store unavailable");
            ApiError::unavailable(
                "The database is unreachable; the request was not carried out. Retry shortly.",
            )
            .with_code("store_unavailable")
            .with_retry_after(2)
        }
        StoreError::Full(_) => {
            tracing::error!(error = %e, "store full");
            ApiError::unavailable(
                "The database's disk is full; nothing was written. Retry once space is freed.",
            )
            .with_code("storage_full")
            .with_retry_after(30)
        }
        other => {
            tracing::error!(error = %other, "store error");
            ApiError::internal("The store failed; retry shortly.")
        }
    }
}

/// `body` (JSON, as a replica sent it) with `status`.
pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Server-sent events from `body`, with `status`.
pub fn event_stream(status: StatusCode, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
