//! The request body as JSON, with refusals in the OpenAI error format: the
//! message and `param` name the field that is wrong (via serde_path_to_error).

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::excerpt::{Excerpt, shorten};

pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        // No JSON content type, no request: a cross-site form post cannot
        // reach the API.
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "the body must be JSON sent as `Content-Type: application/json` (got {})",
                    content_type.map_or("no Content-Type".into(), |t| Excerpt(&t).to_string())
                ),
            ));
        }
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
        // serde quotes the values it refuses, and a path holds map keys:
        // both come from the client and are cut.
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = shorten(&e.path().to_string()).into_owned();
            let inner = e.into_inner();
            let reason = inner.to_string();
            let reason = shorten(&reason);
            if inner.is_syntax() || inner.is_eof() {
                ApiError::invalid("body", format!("the body is not valid JSON: {reason}"))
            } else if path == "." {
                ApiError::invalid("body", reason)
            } else if reason.contains("did not match any variant") {
                ApiError::invalid(path.clone(), format!("{path}: {}", expected_shape(&path)))
            } else {
                ApiError::invalid(path.clone(), format!("{path}: {reason}"))
            }
        })?;
        deserializer.end().map_err(|e| {
            ApiError::invalid(
                "body",
                format!("the body is not valid JSON: {}", shorten(&e.to_string())),
            )
        })?;
        Ok(Self(value))
    }
}

/// `application/json`, or `application/…+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_content_types_pass() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.api+json",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/json+x",
        ] {
            assert!(!is_json(other), "{other}");
        }
    }
}
