//! Who is asking: `Authorization: Bearer <key>` or `X-API-Key: <key>`, looked up by hash in
//! the keys the daemon read from its metadata store at start (keys are created and revoked
//! with the daemon stopped, so that copy is exact). No key, a wrong key or a revoked key is
//! 401.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::App;
use crate::error::ApiError;

/// The authenticated tenant of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// The key a request carries, if any.
pub fn presented_key(parts: &Parts) -> Option<&str> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some(key) = v.strip_prefix("Bearer ")
    {
        return Some(key.trim());
    }
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl FromRequestParts<App> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let key = presented_key(parts).ok_or_else(|| {
            ApiError::unauthorized("no API key: send `Authorization: Bearer <key>` or `X-API-Key`")
        })?;
        let tenant = app
            .keys
            .get(&crate::db::key_hash(key))
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
        tracing::Span::current().record("tenant", tenant.as_str());
        Ok(Tenant(tenant))
    }
}
