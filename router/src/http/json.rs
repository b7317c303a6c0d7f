//! The request body as JSON, with refusals in the OpenAI error format: the
//! message and `param` name the field that is wrong (via serde_path_to_error).

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(request, state).await.map_err(|e| {
            let status = e.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request body is larger than {} bytes",
                    super::MAX_BODY_BYTES
                )
            } else {
                e.body_text()
            };
            ApiError::new(status, message)
        })?;
        let mut deserializer = serde_json::Deserializer::from_slice(&body);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::invalid("body", format!("the body is not valid JSON: {inner}"))
            } else if path == "." {
                ApiError::invalid("body", inner.to_string())
            } else if inner.to_string().contains("did not match any variant") {
                ApiError::invalid(path.clone(), format!("{path}: {}", expected_shape(&path)))
            } else {
                ApiError::invalid(path.clone(), format!("{path}: {inner}"))
            }
        })?;
        deserializer
            .end()
            .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
        Ok(Self(value))
    }
}

/// What a field that takes several shapes accepts.
fn expected_shape(path: &str) -> &'static str {
    match path {
        "prompt" => {
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        }
        "stop" => "must be a string or a list of strings",
        p if p.ends_with(".content") => "must be a string or a list of content parts",
        _ => "has the wrong type",
    }
}
