//! The one error shape of the HTTP API: `{"error":{"code":"...","message":"..."}}` with the
//! matching status. Every handler returns [`ApiError`]; each domain error maps to one.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// A failed request: status, a stable machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`not_found`, `unauthorized`, ...).
    pub code: &'static str,
    /// What went wrong, in words.
    pub message: String,
}

/// The JSON body of an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: String,
    /// Message.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or not allowed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: no key, a wrong key or a revoked key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404: no such thing (for this tenant).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409: the thing is in the wrong state for the request.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413: the body is larger than allowed.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 429: a quota is exhausted.
    pub fn quota(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
    }

    /// 503: the daemon is busy or shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500: the daemon failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl ApiError {
    /// 403: the guest refused access to a path, or a tenant's key asked for an admin route.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// A `fissile-sandbox` failure during `step`: the VMM's and the agent's refusals keep
    /// their kind (400/404/409/503); anything else is the daemon's failure (500).
    pub fn sandbox(step: &str, e: &fissile_sandbox::SandboxError) -> Self {
        use fissile_proto::control::ErrorKind;
        use fissile_sandbox::SandboxError as E;
        use fissile_sandbox::control::ControlError;
        let message = format!("{step}: {}", fissile_proto::error_chain(e));
        match e {
            E::Control(ControlError::Refused { kind, .. }) => match kind {
                ErrorKind::BadRequest => Self::bad_request(message),
                ErrorKind::NotFound => Self::not_found(message),
                ErrorKind::Conflict => Self::conflict(message),
                ErrorKind::Busy => Self::unavailable(message),
                ErrorKind::Internal => Self::internal(message),
            },
            E::Agent(a) => Self::agent(step, a),
            E::ForkCount(_) | E::SelfMerge => Self::bad_request(message),
            _ => Self::internal(message),
        }
    }

    /// An agent failure during `step`, by the kind the agent reported.
    pub fn agent(step: &str, e: &fissile_agent::ClientError) -> Self {
        use fissile_agent::ClientError as C;
        use fissile_proto::agent::FailureKind as K;
        let message = format!("{step}: {}", fissile_proto::error_chain(e));
        match e {
            C::Failed { kind, .. } => match kind {
                K::BadRequest | K::BadFrame => Self::bad_request(message),
                K::NotFound => Self::not_found(message),
                K::PermissionDenied => Self::forbidden(message),
                // An I/O error in the guest (busy, not a directory, no space, ...) is the
                // state of the guest, not a failure of the daemon.
                K::Conflict | K::Io => Self::conflict(message),
                K::Busy => Self::unavailable(message),
                K::Unsupported | K::Internal => Self::internal(message),
            },
            C::TooLarge(_) => Self::too_large(message),
            _ => Self::internal(message),
        }
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        ApiError::internal(fissile_proto::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_one_json_shape_with_their_status() {
        let r = ApiError::not_found("no sandbox sb-1").into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let body = ApiError::quota("3 sandboxes at most").body();
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"quota_exceeded","message":"3 sandboxes at most"}}"#
        );
    }

    #[test]
    fn a_guest_io_error_is_a_conflict_not_a_daemon_failure() {
        let e = fissile_agent::ClientError::Failed {
            kind: fissile_proto::agent::FailureKind::Io,
            message: "cannot remove /tmp/x: Device or resource busy".into(),
        };
        assert_eq!(ApiError::agent("removing", &e).code, "conflict");
    }
}
