//! The HTTP routes (v1). Handlers parse, authorize ([`Tenant`]) and call [`App`]; limits are
//! layers (body size, request id, tracing), not checks scattered in handlers.

use std::collections::BTreeMap;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::{App, CreateSpec, DEFAULT_TEMPLATE, blocking};
use crate::auth::Tenant;
use crate::db::{NetworkPolicy, SandboxRecord, SandboxState};
use crate::error::{ApiError, ErrorBody};
use crate::exec::{self, CommandBody, CommandEvent, ExecBody, ExecEvent};
use crate::files;
use crate::lifecycle::{ForkView, SnapshotView};
use crate::spaces::SpaceView;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 2 << 20;

/// A JSON body whose rejections (malformed JSON, wrong types, unknown fields, too large)
/// are [`ApiError`]s in the one error shape. Any content type is read as JSON (so `curl -d`
/// works), and an empty body (or `null`) is `{}`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// Reads a JSON body under [`MAX_JSON_BODY`], every rejection an [`ApiError`]. An empty body
/// or a JSON `null` is `{}` when `empty_is_default`, and refused otherwise.
async fn json_body<T: serde::de::DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
    empty_is_default: bool,
) -> Result<T, ApiError> {
    let bytes = match axum::body::Bytes::from_request(req, state).await {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::too_large(format!(
                "the body is larger than {MAX_JSON_BODY} bytes"
            )));
        }
        Err(e) => return Err(ApiError::bad_request(e.body_text())),
    };
    let mut text = bytes.trim_ascii();
    if text.is_empty() || text == b"null" {
        if !empty_is_default {
            return Err(ApiError::bad_request("a JSON body is required"));
        }
        // Every field at its default.
        text = b"{}";
    }
    serde_json::from_slice(text).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_body(req, state, true).await.map(ApiJson)
    }
}

/// [`ApiJson`] for a body that must be present: an empty body or `null` is a 400, not `{}`
/// (a `PATCH` of the network policy must not silently reset it to the defaults).
#[derive(Debug)]
pub struct RequiredJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for RequiredJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_body(req, state, false).await.map(RequiredJson)
    }
}

/// `Query` whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Template (default `python-datasci`).
    #[serde(default)]
    pub template: Option<String>,
    /// Guest memory in MiB (default 512).
    #[serde(default)]
    #[schema(minimum = 128, maximum = 16384)]
    pub memory_mib: Option<u64>,
    /// vCPUs (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8)]
    pub vcpus: Option<u8>,
    /// Labels (at most 32, keys of 1-256 bytes, values up to 256 bytes).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for every cell and command, over a built template's own (at
    /// most 128, and 128 with the template's; names of 1-256 bytes without `=` or NUL,
    /// values up to 32 KiB).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A persistent space: closing the sandbox persists it instead of discarding it.
    #[serde(default)]
    pub persistent: bool,
    /// Seconds without a request after which it is closed (persisted if persistent).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub idle_timeout_s: Option<u64>,
    /// Seconds after which it is closed however busy (persisted if persistent). Its tenant's
    /// or the daemon's limit, if shorter, applies instead.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_lifetime_s: Option<u64>,
    /// Restore one of the caller's snapshots instead of booting the template.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Its egress policy. Absent or null: the guest has a network device but reaches
    /// nothing outside its sandbox (until `PATCH .../network` gives it a policy).
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxView {
    /// Its id.
    pub id: String,
    /// The persistent space it runs, if it is persistent.
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
    /// Idle timeout in seconds, if set.
    pub idle_timeout_s: Option<u64>,
    /// Its own lifetime limit in seconds, if set.
    pub max_lifetime_s: Option<u64>,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// Its egress policy (null: it reaches nothing outside its sandbox).
    pub network: Option<NetworkPolicy>,
}

impl From<SandboxRecord> for SandboxView {
    fn from(r: SandboxRecord) -> Self {
        Self {
            id: r.id,
            space_id: r.space_id,
            template: r.template,
            state: r.state,
            created_at_ms: r.created_ms,
            memory_mib: r.memory_mib,
            vcpus: r.vcpus,
            idle_timeout_s: r.idle_timeout_s,
            max_lifetime_s: r.max_lifetime_s,
            metadata: r.metadata,
            network: r.network,
        }
    }
}

fn labels_ok(m: &BTreeMap<String, String>, most: usize, value_max: usize) -> bool {
    m.len() <= most
        && m.iter()
            .all(|(k, v)| !k.is_empty() && k.len() <= 256 && v.len() <= value_max)
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
    if !labels_ok(&body.metadata, 32, 256) {
        return Err(ApiError::bad_request(
            "metadata: at most 32 labels, keys of 1-256 bytes, values up to 256 bytes",
        ));
    }
    if !labels_ok(&body.env, crate::app::MAX_ENV_VARS, 32 << 10)
        || body.env.keys().any(|k| k.contains(['=', '\0']))
    {
        return Err(ApiError::bad_request(format!(
            "env: at most {} variables, names of 1-256 bytes without `=` or NUL, values up \
             to 32 KiB",
            crate::app::MAX_ENV_VARS
        )));
    }
    if body.idle_timeout_s == Some(0) {
        return Err(ApiError::bad_request("idle_timeout_s must be at least 1"));
    }
    if body.max_lifetime_s == Some(0) {
        return Err(ApiError::bad_request("max_lifetime_s must be at least 1"));
    }
    if let Some(n) = &body.network {
        n.to_egress().map_err(ApiError::bad_request)?;
    }
    Ok(CreateSpec {
        template: body
            .template
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
        memory_mib,
        vcpus,
        metadata: body.metadata,
        persistent: body.persistent,
        idle_timeout_s: body.idle_timeout_s,
        max_lifetime_s: body.max_lifetime_s,
        from_snapshot: body.from_snapshot,
        env: body.env,
        network: body.network,
    })
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body(content = Option<CreateBody>, description = "optional: an empty body is `{}` (every default)"), 
    responses((status = 201, description = "created and running", body = SandboxView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such template or snapshot", body = ErrorBody), (status = 409, description = "deleted while it started (its VMM is stopped)", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody), (status = 429, description = "a quota is exhausted", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn create(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<SandboxView>), ApiError> {
    let spec = validate(body)?;
    let record = app
        .metrics
        .timed("create", app.create(&tenant, spec))
        .await?;
    tracing::info!(sandbox = %record.id, %tenant, "sandbox created");
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// `GET /v1/sandboxes` query: `metadata.<key>=<value>` filters.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",  params(("metadata.<key>" = Option<String>, Query, description = "only sandboxes with this label value (repeatable with other keys)")),
    responses((status = 200, description = "the caller's sandboxes, oldest first", body = Vec<SandboxView>), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    ApiQuery(q): ApiQuery<BTreeMap<String, String>>,
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

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",  params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "the sandbox", body = SandboxView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn get_one(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let r = blocking(move || app.record(&tenant, &id)).await?;
    Ok(Json(r.into()))
}

#[utoipa::path(patch, path = "/v1/sandboxes/{id}/network", tag = "sandboxes",  params(("id" = String, Path, description = "sandbox id")), request_body = NetworkPolicy,
    responses((status = 200, description = "the policy is in force: the guest's next connections follow it (open ones keep going)", body = SandboxView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state, or this daemon gives sandboxes no network", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn set_network(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    RequiredJson(body): RequiredJson<NetworkPolicy>,
) -> Result<Json<SandboxView>, ApiError> {
    let policy = body.to_egress().map_err(ApiError::bad_request)?;
    let r = app.set_network(&tenant, &id, body, policy).await?;
    tracing::info!(sandbox = %id, %tenant, network = ?r.network, "egress policy changed");
    Ok(Json(r.into()))
}

/// What a sandbox's network rules counted since its namespace got its way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkCounters {
    /// New connections its policy rejected.
    pub blocked_connections: u64,
    /// New connections rejected because the daemon's connection cap was reached.
    pub connection_cap_hits: u64,
    /// Packets dropped over the daemon's bandwidth cap.
    pub rate_dropped_packets: u64,
    /// Their bytes.
    pub rate_dropped_bytes: u64,
}

/// A sandbox's egress policy and what its rules counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkView {
    /// Its policy (null: it reaches nothing outside its sandbox).
    pub policy: Option<NetworkPolicy>,
    /// Its counters (zeroes without a network namespace).
    pub counters: NetworkCounters,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/network", tag = "sandboxes",  params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "its policy and counters", body = NetworkView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn get_network(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<NetworkView>, ApiError> {
    let c = app.network_counters(&tenant, &id).await?;
    let policy = app.record(&tenant, &id)?.network;
    Ok(Json(NetworkView {
        policy,
        counters: NetworkCounters {
            blocked_connections: c.blocked_connections,
            connection_cap_hits: c.connection_cap_hits,
            rate_dropped_packets: c.rate_dropped_packets,
            rate_dropped_bytes: c.rate_dropped_bytes,
        },
    }))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",  params(("id" = String, Path, description = "sandbox id")),
    responses((status = 204, description = "closed (a persistent one was persisted into its space first)"), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn delete_one(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.metrics.timed("close", app.delete(&tenant, &id)).await?;
    tracing::info!(sandbox = %id, %tenant, "sandbox closed");
    Ok(StatusCode::NO_CONTENT)
}

/// The sandbox's environment under the request's own.
fn merged_env(
    base: &BTreeMap<String, String>,
    own: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = base.clone();
    env.extend(own);
    env
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "execution", request_body = ExecBody, params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "NDJSON: one ExecEvent a line, `done` (or `failed`) last", content_type = "application/x-ndjson", body = ExecEvent), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn exec_cell(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, ApiError> {
    let mut req = exec::request(body)?;
    let live = app.get_booted(&tenant, &id)?;
    req.env = merged_env(&live.record.env, std::mem::take(&mut req.env));
    let vsock = live.vsock.clone();
    let agent = live.agents.checkout(&vsock, &app.metrics).await?;
    Ok(exec::stream(agent, vsock, req, live.stream_guard(), app.metrics.clone()).await)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands", tag = "execution", request_body = CommandBody, params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "NDJSON: one CommandEvent a line, `exit` (or `failed`) last", content_type = "application/x-ndjson", body = CommandEvent), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn run_command(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CommandBody>,
) -> Result<Response, ApiError> {
    let mut req = exec::command_request(body)?;
    let live = app.get_booted(&tenant, &id)?;
    req.env = merged_env(&live.record.env, std::mem::take(&mut req.env));
    let agent = live.agents.checkout(&live.vsock, &app.metrics).await?;
    Ok(exec::stream_command(agent, req, live.stream_guard()).await)
}

/// Answer of `POST /v1/sandboxes/{id}/interrupt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InterruptView {
    /// A cell was running and got a KeyboardInterrupt.
    pub was_running: bool,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/interrupt", tag = "execution",  params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, description = "interrupted (if a cell was running)", body = InterruptView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn interrupt(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<InterruptView>, ApiError> {
    let live = app.get_booted(&tenant, &id)?;
    let vsock = live.vsock.clone();
    let was_running = blocking(move || {
        exec::connect(&vsock)?
            .interrupt()
            .map_err(|e| ApiError::agent("interrupting", &e))
    })
    .await?;
    Ok(Json(InterruptView { was_running }))
}

/// Query of the file routes.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path in the guest (no NUL, no `..` component).
    #[param(pattern = "^/")]
    pub path: String,
    /// `DELETE` only: remove a directory and its contents.
    #[serde(default)]
    pub recursive: bool,
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes (streamed)"), params(("id" = String, Path, description = "sandbox id"), FileQuery),
    responses((status = 201, description = "written (whole: an upload lands by rename)", body = files::UploadView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 403, description = "the guest refused", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn put_file(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    req: Request,
) -> Result<(StatusCode, Json<files::UploadView>), ApiError> {
    let path = files::guest_path(&q.path)?;
    let live = app.get_booted(&tenant, &id)?;
    let max = app.config.max_file_bytes;
    if let Some(len) = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        return Err(ApiError::too_large(format!(
            "the upload is {len} bytes; uploads are limited to {max}"
        )));
    }
    let view = files::upload(
        live.vsock.clone(),
        path,
        req.into_body(),
        max,
        live.stream_guard(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",  params(("id" = String, Path, description = "sandbox id"), FileQuery),
    responses((status = 200, description = "the file's bytes (streamed)", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox or file", body = ErrorBody), (status = 403, description = "the guest refused", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn get_file(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let path = files::guest_path(&q.path)?;
    let live = app.get_booted(&tenant, &id)?;
    files::download(
        live.vsock.clone(),
        path,
        app.config.max_file_bytes,
        live.stream_guard(),
    )
    .await
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files",  params(("id" = String, Path, description = "sandbox id"), FileQuery),
    responses((status = 204, description = "removed"), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox or file", body = ErrorBody), (status = 403, description = "the guest refused", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn delete_file(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<StatusCode, ApiError> {
    let path = files::guest_path(&q.path)?;
    let live = app.get_booted(&tenant, &id)?;
    files::remove(live.vsock.clone(), path, q.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /v1/sandboxes/{id}/files/list`.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Absolute directory path in the guest (no NUL, no `..` component).
    #[param(pattern = "^/")]
    pub path: String,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files",  params(("id" = String, Path, description = "sandbox id"), ListQuery),
    responses((status = 200, description = "the directory's entries", body = files::ListView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox or directory", body = ErrorBody), (status = 403, description = "the guest refused", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn list_files(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<files::ListView>, ApiError> {
    let path = files::guest_path(&q.path)?;
    let live = app.get_booted(&tenant, &id)?;
    Ok(Json(files::list(live.vsock.clone(), path).await?))
}

/// Body of `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many children: 1 up to the daemon's limit (`--max-fork`, 32 by default; above it
    /// the answer is 429), at most 64.
    #[schema(minimum = 1, maximum = 64)]
    pub n: u64,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "lifecycle", request_body = ForkBody, params(("id" = String, Path, description = "the parent")),
    responses((status = 200, description = "one entry per child: its id or its error", body = ForkView), (status = 400, description = "bad input", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 429, description = "a quota is exhausted", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn fork(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ForkBody>,
) -> Result<Json<ForkView>, ApiError> {
    let n = u32::try_from(body.n).unwrap_or(u32::MAX);
    let view = app.metrics.timed("fork", app.fork(&tenant, &id, n)).await?;
    tracing::info!(sandbox = %id, %tenant, n, "forked");
    Ok(Json(view))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/merge_into/{winner}", tag = "lifecycle",  params(("id" = String, Path, description = "the parent"), ("winner" = String, Path, description = "a child of the parent's latest fork")),
    responses((status = 204, description = "the parent now holds the winner's state"), (status = 400, description = "self-merge", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "unknown winner, not a child of the latest fork, or a repeated merge", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 503, description = "busy", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn merge_into(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path((parent, winner)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.metrics
        .timed("merge", app.merge(&tenant, &parent, &winner))
        .await?;
    tracing::info!(sandbox = %parent, %winner, %tenant, "merged");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", tag = "lifecycle",  params(("id" = String, Path, description = "sandbox id")),
    responses((status = 201, description = "durable in the store", body = SnapshotView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox (for this tenant)", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 503, description = "busy", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn snapshot(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SnapshotView>), ApiError> {
    let view = app
        .metrics
        .timed("snapshot", app.snapshot(&tenant, &id))
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/rollback/{snapshot}", tag = "lifecycle",  params(("id" = String, Path, description = "sandbox id"), ("snapshot" = String, Path, description = "one of its own snapshots")),
    responses((status = 204, description = "back to the snapshot, same id"), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such sandbox, or not one of its snapshots", body = ErrorBody), (status = 409, description = "the sandbox is in the wrong state", body = ErrorBody), (status = 503, description = "busy", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn rollback(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.metrics
        .timed("rollback", app.rollback(&tenant, &id, &snap))
        .await?;
    tracing::info!(sandbox = %id, snapshot = %snap, %tenant, "rolled back");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, description = "the daemon's template and the caller's own (built or being built), with their ready snapshots", body = Vec<crate::templates::TemplateView>), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn list_templates(
    State(app): State<App>,
    Tenant(tenant): Tenant,
) -> Result<Json<Vec<crate::templates::TemplateView>>, ApiError> {
    let mut all = app.templates();
    all.extend(blocking(move || app.built_templates(&tenant)).await?);
    Ok(Json(all))
}

#[utoipa::path(post, path = "/v1/templates", tag = "templates", request_body = crate::template_build::BuildBody,
    responses((status = 200, description = "NDJSON: one BuildEvent a line, `done` (or `failed`) last; a client that disconnects does not stop the build", content_type = "application/x-ndjson", body = crate::template_build::BuildEvent), (status = 400, description = "bad input (the message names the spec's field)", body = ErrorBody), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 409, description = "the name is taken or being built", body = ErrorBody), (status = 413, description = "too large", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn build_template(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<crate::template_build::BuildBody>,
) -> Result<Response, ApiError> {
    let a = app.clone();
    blocking(move || a.build_template(&tenant, body)).await
}

#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates", params(("name" = String, Path, description = "template name")),
    responses((status = 204, description = "forgotten, its snapshots freed; its sandboxes run on"), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such template (for this tenant)", body = ErrorBody), (status = 409, description = "the daemon's own template, or one being built", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn delete_template(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.delete_template(&tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/spaces", tag = "spaces",  
    responses((status = 200, description = "the caller's spaces", body = Vec<SpaceView>), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn list_spaces(
    State(app): State<App>,
    Tenant(tenant): Tenant,
) -> Result<Json<Vec<SpaceView>>, ApiError> {
    let all = blocking(move || app.spaces(&tenant)).await?;
    Ok(Json(all.into_iter().map(Into::into).collect()))
}

#[utoipa::path(get, path = "/v1/spaces/{id}", tag = "spaces",  params(("id" = String, Path, description = "space id")),
    responses((status = 200, description = "the space", body = SpaceView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such space", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn get_space(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<SpaceView>, ApiError> {
    let s = blocking(move || app.space(&tenant, &id)).await?;
    Ok(Json(s.into()))
}

#[utoipa::path(delete, path = "/v1/spaces/{id}", tag = "spaces",  params(("id" = String, Path, description = "space id")),
    responses((status = 204, description = "deleted (its sandbox stopped without persisting)"), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such space", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn delete_space(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.delete_space(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/spaces/{id}/resume", tag = "spaces",  params(("id" = String, Path, description = "space id")),
    responses((status = 201, description = "a new sandbox with the space's state", body = SandboxView), (status = 200, description = "the sandbox already running it", body = SandboxView), (status = 401, description = "no key, a wrong key or a revoked key", body = ErrorBody), (status = 404, description = "no such space", body = ErrorBody), (status = 409, description = "never persisted, or lost, or the sandbox was deleted while it started", body = ErrorBody), (status = 429, description = "a quota is exhausted", body = ErrorBody), (status = 500, description = "the daemon failed", body = ErrorBody)),
    security(("bearer" = []), ("api_key" = [])))]
pub(crate) async fn resume_space(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SandboxView>), ApiError> {
    let (record, started) = app
        .metrics
        .timed("resume", app.resume(&tenant, &id))
        .await?;
    let status = if started {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record.into())))
}

#[utoipa::path(get, path = "/healthz", tag = "daemon",
    responses((status = 200, description = "the daemon answers", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Answer of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

async fn metrics(State(app): State<App>) -> Response {
    let text = blocking(move || {
        let socket = app.snapshotd.socket().to_path_buf();
        let store = fissile_snapshotd_client::client::Client::connect(&socket)
            .and_then(|mut c| c.stats())
            .ok();
        let network = app.network_totals();
        Ok(app.metrics.render(
            &app.counts(),
            store.as_ref(),
            &network,
            app.snapshotd.restarts(),
        ))
    })
    .await;
    match text {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Records each matched request's latency (to its response head) by route template.
async fn track(
    State(app): State<App>,
    matched: Option<axum::extract::MatchedPath>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let t0 = std::time::Instant::now();
    let method = req.method().to_string();
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    app.metrics
        .request(&method, &route, resp.status().as_u16(), t0);
    resp
}

async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The router with its layers.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(get_one).delete(delete_one))
        .route(
            "/v1/sandboxes/{id}/network",
            get(get_network).patch(set_network),
        )
        .route("/v1/sandboxes/{id}/exec", post(exec_cell))
        .route("/v1/sandboxes/{id}/commands", post(run_command))
        .route("/v1/sandboxes/{id}/interrupt", post(interrupt))
        .route(
            "/v1/sandboxes/{id}/files",
            // Uploads stream under their own cap (`--max-file-bytes`), not the JSON limit.
            put(put_file)
                .get(get_file)
                .delete(delete_file)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/sandboxes/{id}/files/list", get(list_files))
        .route("/v1/sandboxes/{id}/fork", post(fork))
        .route("/v1/sandboxes/{id}/merge_into/{winner}", post(merge_into))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route("/v1/sandboxes/{id}/rollback/{snapshot}", post(rollback))
        .route("/v1/templates", get(list_templates).post(build_template))
        .route(
            "/v1/templates/{name}",
            axum::routing::delete(delete_template),
        )
        .route("/v1/spaces", get(list_spaces))
        .route("/v1/spaces/{id}", get(get_space).delete(delete_space))
        .route("/v1/spaces/{id}/resume", post(resume_space))
        .route(
            "/v1/keys",
            post(crate::keys::create_key).get(crate::keys::list_keys),
        )
        .route(
            "/v1/keys/{id}",
            axum::routing::delete(crate::keys::revoke_key),
        )
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), track))
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
            // A key route's path may hold a key pasted by mistake (`DELETE /v1/keys/fsk_…`):
            // its route is logged, not the path.
            let path = req.uri().path();
            let path = if path.starts_with("/v1/keys/") {
                "/v1/keys/{id}"
            } else {
                path
            };
            tracing::info_span!("request", method = %req.method(), path = %path,
                request_id = %id, tenant = tracing::field::Empty)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}
