//! Errors as the OpenAI API writes them:
//! `{"error": {"message", "type", "param", "code"}}` with a fitting status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use tramontane_infra::error::chain;

use crate::completion::RETRY_AFTER_SECONDS;
use tramontane_dispatch::error::DispatchError;

use crate::failure::GenerationError;
use crate::sampling::InvalidParam;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A request without the key a route needs: 401 with `code` and
    /// `WWW-Authenticate: Bearer`.
    pub fn unauthorized(message: &str, code: &'static str) -> Response {
        let mut response = Self::new(StatusCode::UNAUTHORIZED, message)
            .with_code(code)
            .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error body as JSON text (for a failure in the middle of a stream).
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            error: Detail {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .expect("plain strings serialize")
    }
}

impl From<InvalidParam> for ApiError {
    fn from(e: InvalidParam) -> Self {
        let message = e.to_string();
        Self::invalid(e.param, message)
    }
}

/// The one mapping of failures to HTTP statuses.
impl From<&GenerationError> for ApiError {
    fn from(e: &GenerationError) -> Self {
        let message = chain(e);
        match e {
            GenerationError::Invalid(invalid) => Self::invalid(invalid.param, message),
            GenerationError::QueueFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, message).with_code("queue_full")
            }
            GenerationError::EngineStopped
            | GenerationError::Draining
            | GenerationError::Dispatch(DispatchError::NoLiveReplica { .. }) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
            GenerationError::Dropped
            | GenerationError::Dispatch(DispatchError::Encode { .. })
            | GenerationError::Dispatch(DispatchError::Combine { .. })
            | GenerationError::Dispatch(DispatchError::Tensor { .. })
            | GenerationError::Forward(_)
            | GenerationError::Guide(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }
}

impl From<GenerationError> for ApiError {
    fn from(e: GenerationError) -> Self {
        Self::from(&e)
    }
}

impl From<std::sync::Arc<GenerationError>> for ApiError {
    fn from(e: std::sync::Arc<GenerationError>) -> Self {
        Self::from(&*e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::examples;

    #[test]
    fn every_failure_kind_has_its_status_and_message() {
        for (kind, error, contains) in examples::all() {
            let api = ApiError::from(&error);
            let expected = match kind {
                "invalid" => StatusCode::BAD_REQUEST,
                "queue full" => StatusCode::TOO_MANY_REQUESTS,
                "engine stopped" | "draining" | "worker status" | "worker deadline"
                | "worker bad answer" => StatusCode::SERVICE_UNAVAILABLE,
                "dropped" | "encode" | "combine" | "tensor" | "forward" => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                other => panic!("no expected status for {other}"),
            };
            assert_eq!(api.status, expected, "{kind}");
            for part in contains {
                assert!(
                    api.message.contains(part),
                    "{kind}: {:?} lacks {part:?}",
                    api.message
                );
            }
            let body: serde_json::Value = serde_json::from_str(&api.body()).unwrap();
            assert_eq!(body["error"]["message"], api.message.as_str(), "{kind}");
            let response = api.into_response();
            assert_eq!(response.status(), expected, "{kind}");
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                kind == "queue full",
                "{kind}"
            );
        }
        let invalid = ApiError::from(&GenerationError::from(InvalidParam::new(
            "top_p",
            "0 is outside (0, 1]",
        )));
        assert_eq!(invalid.param.as_deref(), Some("top_p"));
        assert_eq!(invalid.kind(), "invalid_request_error");
    }
}
