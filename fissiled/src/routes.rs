//! The HTTP routes (v1). Handlers parse, authorize ([`Tenant`]) and call [`App`]; limits are
//! layers (body size, request id, tracing), not checks scattered in handlers.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::{App, CreateSpec, DEFAULT_TEMPLATE, blocking};
use crate::auth::Tenant;
use crate::db::{SandboxRecord, SandboxState};
use crate::error::ApiError;
use crate::exec::{self, ExecBody};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 2 << 20;

/// `Json` whose rejections (malformed JSON, wrong types, unknown fields, too large) are
/// [`ApiError`]s in the one error shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::too_large(format!(
                    "the body is larger than {MAX_JSON_BODY} bytes"
                )))
            }
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Template (default `python-datasci`).
    #[serde(default)]
    pub template: Option<String>,
    /// Guest memory in MiB (default 512).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// vCPUs (default 1).
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// Labels (at most 32, keys and values up to 256 bytes).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxView {
    /// Its id.
    pub id: String,
    /// The persistent space it belongs to (none yet: spaces are not served yet).
    pub space_id: Option<String>,
    /// Template.
    pub template: String,
    /// `starting`, `running`, or `lost` (its VMM is gone after a daemon restart).
    pub state: SandboxState,
    /// Created, ms since the epoch.
    pub created_at_ms: u64,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
}

impl From<SandboxRecord> for SandboxView {
    fn from(r: SandboxRecord) -> Self {
        Self {
            id: r.id,
            space_id: None,
            template: r.template,
            state: r.state,
            created_at_ms: r.created_ms,
            memory_mib: r.memory_mib,
            vcpus: r.vcpus,
            metadata: r.metadata,
        }
    }
}

fn validate(body: CreateBody) -> Result<CreateSpec, ApiError> {
    let memory_mib = body.memory_mib.unwrap_or(512);
    if !(128..=16384).contains(&memory_mib) {
        return Err(ApiError::bad_request(format!(
            "memory_mib must be in 128..=16384, got {memory_mib}"
        )));
    }
    let vcpus = body.vcpus.unwrap_or(1);
    if !(1..=8).contains(&vcpus) {
        return Err(ApiError::bad_request(format!(
            "vcpus must be in 1..=8, got {vcpus}"
        )));
    }
    if body.metadata.len() > 32
        || body
            .metadata
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 256)
    {
        return Err(ApiError::bad_request(
            "metadata: at most 32 labels, keys of 1-256 bytes, values up to 256 bytes",
        ));
    }
    Ok(CreateSpec {
        template: body
            .template
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
        memory_mib,
        vcpus,
        metadata: body.metadata,
    })
}

async fn create(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<SandboxView>), ApiError> {
    let spec = validate(body)?;
    let record = app.create(&tenant, spec).await?;
    tracing::info!(sandbox = %record.id, %tenant, "sandbox created");
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// `GET /v1/sandboxes` query: `metadata.<key>=<value>` filters.
async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<SandboxView>>, ApiError> {
    let mut filters = Vec::new();
    for (k, v) in q {
        let key = k.strip_prefix("metadata.").ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown query parameter {k} (filter with metadata.<key>)"
            ))
        })?;
        filters.push((key.to_string(), v));
    }
    let all = blocking(move || app.list(&tenant)).await?;
    Ok(Json(
        all.into_iter()
            .filter(|r| filters.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
            .map(Into::into)
            .collect(),
    ))
}

async fn get_one(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let r = blocking(move || app.record(&tenant, &id)).await?;
    Ok(Json(r.into()))
}

async fn delete_one(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.delete(&tenant, &id).await?;
    tracing::info!(sandbox = %id, %tenant, "sandbox deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn exec_cell(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, ApiError> {
    let req = exec::request(body)?;
    let live = app.get(&tenant, &id)?;
    let vsock = live.vsock.clone();
    let booted = live.sandbox.lock().map(|s| s.is_some()).unwrap_or(true);
    if !booted {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is still starting"
        )));
    }
    let agent = {
        let vsock = vsock.clone();
        blocking(move || exec::connect(&vsock)).await?
    };
    Ok(exec::stream(agent, vsock, req))
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The router with its layers.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(get_one).delete(delete_one))
        .route("/v1/sandboxes/{id}/exec", post(exec_cell))
        .fallback(not_found)
        .with_state(app)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(),
                request_id = %id, tenant = tracing::field::Empty)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}
