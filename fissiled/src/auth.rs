//! Who is asking: `Authorization: Bearer <key>` or `X-API-Key: <key>`, looked up by hash in
//! the daemon's [`KeyRing`] (read from the metadata store at start, then kept in step with
//! it by the key routes, so a key created or revoked over the API counts at once). No key,
//! a wrong key or a revoked key is 401; a tenant's key on an admin route is 403.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::App;
use crate::db::ActiveKey;
use crate::error::ApiError;

/// The keys that are not revoked, by hash. Changes go through [`KeyRing::change`]: one at
/// a time, the store written and then the ring, in one step that a client going away
/// cannot cut in two (it runs on the blocking pool to the end).
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: RwLock<HashMap<String, ActiveKey>>,
    changes: Mutex<()>,
}

/// The ring's keys, for the one change in progress ([`KeyRing::change`]).
#[derive(Debug)]
pub struct KeyChange<'a>(&'a RwLock<HashMap<String, ActiveKey>>);

impl KeyChange<'_> {
    /// Adds a key (after the store holds it).
    pub fn insert(&self, hash: String, key: ActiveKey) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash, key);
    }

    /// Forgets a key (after the store holds it revoked).
    pub fn remove(&self, hash: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(hash);
    }
}

impl KeyRing {
    /// The ring of `keys` (hash → what it grants).
    pub fn new(keys: HashMap<String, ActiveKey>) -> Self {
        Self {
            keys: RwLock::new(keys),
            changes: Mutex::new(()),
        }
    }

    /// What the key with hash `hash` grants, if it is not revoked.
    pub fn get(&self, hash: &str) -> Option<ActiveKey> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(hash)
            .cloned()
    }

    /// Runs `f` (write the store, then the ring) with no other change in progress: a key
    /// created and revoked at once by two admins ends revoked in both.
    pub fn change<T>(&self, f: impl FnOnce(KeyChange<'_>) -> T) -> T {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        f(KeyChange(&self.keys))
    }
}

/// The authenticated tenant of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// The tenant of a request made with an admin key (the key routes need one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin(pub String);

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

fn caller(parts: &Parts, app: &App) -> Result<ActiveKey, ApiError> {
    let key = presented_key(parts).ok_or_else(|| {
        ApiError::unauthorized("no API key: send `Authorization: Bearer <key>` or `X-API-Key`")
    })?;
    let found = app
        .keys
        .get(&crate::db::key_hash(key))
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
    tracing::Span::current().record("tenant", found.tenant.as_str());
    Ok(found)
}

impl FromRequestParts<App> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        caller(parts, app).map(|k| Tenant(k.tenant))
    }
}

impl FromRequestParts<App> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let key = caller(parts, app)?;
        if !key.admin {
            return Err(ApiError::forbidden(
                "managing keys needs an admin key (`fissiled keys create --admin`)",
            ));
        }
        Ok(Admin(key.tenant))
    }
}
