//! The one error type every HTTP surface returns. It renders as OpenAI's
//! `{"error":{"message","type","param","code"}}` with the matching status.

use serde::Serialize;

/// An error a client can see: status, message and the OpenAI error fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`: sent on a 429 (1 when not set) and on any
    /// other status that sets it.
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Fields<'a>,
}

#[derive(Serialize)]
struct Fields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: the request is malformed or a field has a bad value.
    pub fn invalid_request(param: Option<&str>, message: impl Into<String>) -> Self {
        let e = Self::new(400, "invalid_request_error", message);
        match param {
            Some(p) => e.with_param(p),
            None => e,
        }
    }

    /// 400 with `context_length_exceeded`: prompt plus completion do not fit.
    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Self::invalid_request(Some("messages"), message).with_code("context_length_exceeded")
    }

    /// 404 for a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "invalid_request_error", message).with_code("not_found")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "Method not allowed for this route.",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            format!("Request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 401 for every kind of bad credential alike, so a caller learns nothing
    /// about which keys exist.
    pub fn unauthorized() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "Incorrect or missing API key. Send `Authorization: Bearer sk-strata-...` with a valid key.",
        )
        .with_code("invalid_api_key")
    }

    /// 401 from a replica to anyone but its gateway.
    pub fn gateway_only() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "This engine answers its gateway only.",
        )
        .with_code("gateway_only")
    }

    /// 403: the key is valid but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "permission_error", message).with_code("forbidden")
    }

    /// 409: the request conflicts with what exists (a duplicate name).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "invalid_request_error", message).with_code("conflict")
    }

    /// 429 from a rate limit, retryable after `retry_after_secs`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(429, "rate_limit_error", message)
            .with_code("rate_limit_exceeded")
            .with_retry_after(retry_after_secs)
    }

    /// 402: the tenant's monthly budget cannot cover the request.
    pub fn budget_exhausted(message: impl Into<String>) -> Self {
        Self::new(402, "insufficient_quota", message).with_code("budget_exhausted")
    }

    /// 429: the server's queue is full; the client should retry later.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(429, "rate_limit_error", message).with_code("server_overloaded")
    }

    /// 503: nothing can serve the request right now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "service_unavailable", message).with_code("no_replica_ready")
    }

    /// 502: the upstream replica failed after retries.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "upstream_error", message).with_code("replica_failed")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message)
    }

    /// The JSON body, exactly as clients receive it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Fields {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .expect("error body is always serializable")
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for ApiError {
    fn into_response(self) -> axum_core::response::Response {
        let status = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, self.to_json()).into_response();
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if status == http::StatusCode::TOO_MANY_REQUESTS || self.retry_after_secs.is_some() {
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(self.retry_after_secs.unwrap_or(1)),
            );
        }
        response
    }
}

/// Reads a request body of at most `limit` bytes; a larger one is a 413.
#[cfg(feature = "axum")]
pub async fn read_body(
    body: axum_core::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) => Err(ApiError::invalid_request(
            None,
            format!("Could not read the request body: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_four_openai_fields() {
        let e = ApiError::invalid_request(Some("max_tokens"), "must be at least 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "must be at least 1");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "max_tokens");
        assert!(v["error"]["code"].is_null());
        assert_eq!(e.status, 400);
    }
}
