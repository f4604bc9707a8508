//! API keys over the API, for admin keys (`fissiled keys create --admin` makes the first one
//! with the daemon stopped): create a key for any tenant, list the keys (by id, never the
//! key), revoke one. A change is in the store before it is in the daemon's [`KeyRing`], so
//! a key that was answered as created or revoked stays so across a restart, and counts at
//! once.
//!
//! [`KeyRing`]: crate::auth::KeyRing

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::app::{App, blocking};
use crate::auth::Admin;
use crate::db::{ActiveKey, key_id, valid_tenant_name};
use crate::error::{ApiError, ErrorBody};
use crate::routes::RequiredJson;

/// `POST /v1/keys` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// The tenant the key acts for (1-64 of `[A-Za-z0-9_-]`; a new name makes a new tenant).
    pub tenant: String,
    /// The key may manage keys too.
    #[serde(default)]
    pub admin: bool,
}

/// A key as it is listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyView {
    /// Its id (what `DELETE /v1/keys/{id}` takes); tells nothing of the key.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// It may manage keys.
    pub admin: bool,
    /// Created, ms since the epoch.
    pub created_at_ms: u64,
}

/// A key just created: the only time the key itself is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewKeyView {
    /// The key (`fsk_…`): send it as `Authorization: Bearer <key>`. Only its hash is
    /// stored; it cannot be shown again.
    pub key: String,
    /// Its id, tenant and creation time.
    #[serde(flatten)]
    pub view: KeyView,
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyBody,
    responses((status = 201, description = "created; in force at once", body = NewKeyView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 403, description = "not an admin key", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn create_key(
    State(app): State<App>,
    Admin(admin): Admin,
    RequiredJson(body): RequiredJson<CreateKeyBody>,
) -> Result<(StatusCode, Json<NewKeyView>), ApiError> {
    if !valid_tenant_name(&body.tenant) {
        return Err(ApiError::bad_request(
            "tenant: a tenant name is 1-64 of [A-Za-z0-9_-]",
        ));
    }
    let (db, ring) = (app.db.clone(), app.keys.clone());
    let created = blocking(move || {
        ring.change(|ring| {
            let created = db.create_key(&body.tenant, body.admin)?;
            let active = ActiveKey {
                tenant: created.record.tenant.clone(),
                admin: created.record.admin,
            };
            ring.insert(created.hash.clone(), active);
            Ok(created)
        })
    })
    .await?;
    let view = KeyView {
        id: key_id(&created.hash),
        tenant: created.record.tenant,
        admin: created.record.admin,
        created_at_ms: created.record.created_ms,
    };
    tracing::info!(key = %view.id, tenant = %view.tenant, admin = view.admin, by = %admin, "key created");
    let key = created.key;
    Ok((StatusCode::CREATED, Json(NewKeyView { key, view })))
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "every key that is not revoked, oldest first", body = Vec<KeyView>), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 403, description = "not an admin key", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn list_keys(
    State(app): State<App>,
    Admin(_): Admin,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let db = app.db.clone();
    let listed = blocking(move || Ok(db.key_listing()?)).await?;
    Ok(Json(
        listed
            .into_iter()
            .map(|k| KeyView {
                id: k.id,
                tenant: k.record.tenant,
                admin: k.record.admin,
                created_at_ms: k.record.created_ms,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path, description = "key id (`key_…`)")),
    responses((status = 204, description = "revoked; refused from now on"), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 403, description = "not an admin key", body = ErrorBody), (status = 404, description = "no key that is not revoked has this id", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn revoke_key(
    State(app): State<App>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !is_key_id(&id) {
        // Not echoed: it may be a key pasted by mistake.
        return Err(ApiError::not_found(
            "no such key: a key id is `key_` and 20 hex digits (GET /v1/keys lists them)",
        ));
    }
    let (db, ring) = (app.db.clone(), app.keys.clone());
    let target = id.clone();
    let revoked = blocking(move || {
        ring.change(|ring| {
            let revoked = db.revoke_key_id(&target)?;
            if let Some(hash) = &revoked {
                ring.remove(hash);
            }
            Ok(revoked)
        })
    })
    .await?;
    if revoked.is_none() {
        return Err(ApiError::not_found(format!("no key {id}")));
    }
    tracing::info!(key = %id, by = %admin, "key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// True for what [`key_id`] makes: `key_` and 20 lowercase hex digits.
pub fn is_key_id(id: &str) -> bool {
    id.strip_prefix("key_")
        .is_some_and(|h| h.len() == 20 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_ids_are_what_key_id_makes_and_nothing_else() {
        let id = crate::db::key_id(&crate::db::key_hash("fsk_x"));
        assert!(super::is_key_id(&id), "{id}");
        for bad in [
            "",
            "key_",
            "fsk_0123456789abcdef0123",
            "key_0123456789ABCDEF0123",
            "key_0123456789abcdef012",
            "key_0123456789abcdef01234",
        ] {
            assert!(!super::is_key_id(bad), "{bad}");
        }
    }
}
