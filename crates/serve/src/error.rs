//! Errors: [`ApiError`] is what a client gets (OpenAI's `{"error": {"message", "type", "param", "code"}}`
//! with a 4xx/5xx status); [`ServeError`] is what stops the server from starting.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to the client in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`, ...
    pub kind: &'static str,
    /// OpenAI's `code`: `model_not_found`, `context_length_exceeded`, `invalid_api_key`, ...
    pub code: Option<&'static str>,
    /// The request field at fault, when there is one.
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// 400 about one field.
    pub fn invalid_param(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param), code: Some(code), ..ApiError::invalid(message) }
    }

    /// 404 for a `model` the server does not have.
    pub fn unknown_model(name: &str, known: &[String]) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!("the model `{name}` does not exist; this server has: {}", known.join(", ")),
        }
    }

    /// 401 for a missing or wrong bearer key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            param: None,
            message: message.into(),
        }
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            code: Some("request_too_large"),
            param: None,
            message: format!("the request body is over the limit of {limit} bytes"),
        }
    }

    /// 404 for a path the server does not serve.
    pub fn no_route(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("unknown_url"),
            param: None,
            message: format!("no such endpoint: {path}"),
        }
    }

    /// 503 when the queue of waiting requests is full or the scheduler has stopped.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some("server_overloaded"),
            param: None,
            message: message.into(),
        }
    }

    /// 500 when the model failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: Some("internal_error"),
            param: None,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::server::json_response(self.status, &self.body())
    }
}

/// What keeps the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("server: {0}")]
    Server(std::io::Error),
    #[error("{0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_openai_shapes_and_statuses() {
        let cases = [
            (ApiError::invalid("bad"), 400, "invalid_request_error", None),
            (
                ApiError::invalid_param("max_tokens", "invalid_value", "x"),
                400,
                "invalid_request_error",
                Some("invalid_value"),
            ),
            (ApiError::unknown_model("m", &["a".into()]), 404, "not_found_error", Some("model_not_found")),
            (ApiError::unauthorized("no key"), 401, "authentication_error", Some("invalid_api_key")),
            (ApiError::too_large(10), 413, "invalid_request_error", Some("request_too_large")),
            (ApiError::overloaded("full"), 503, "server_error", Some("server_overloaded")),
            (ApiError::internal("boom"), 500, "server_error", Some("internal_error")),
        ];
        for (error, status, kind, code) in cases {
            assert_eq!(error.status.as_u16(), status);
            let body = error.body();
            let e = &body["error"];
            assert_eq!(e["type"], kind);
            assert_eq!(e["code"].as_str(), code);
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(error.into_response().status().as_u16(), status);
        }
        assert_eq!(ApiError::invalid_param("max_tokens", "invalid_value", "x").body()["error"]["param"], "max_tokens");
        assert!(ApiError::unknown_model("m", &["a".into(), "b".into()]).message.contains("a, b"));
    }
}
