//! fissiled: the one daemon per host that Fissile's users talk to, over an HTTP API (axum on
//! tokio). It owns snapshotd and every VMM process on its host (through `fissile-sandbox`),
//! keeps tenants, keys and sandboxes in an embedded transactional store (redb), and streams
//! cell output as NDJSON.
//!
//! - [`routes`]: the HTTP surface (parse, authorize, call the service; the error shape).
//! - [`app`]: the service that owns the running sandboxes; blocking work on the blocking pool.
//! - [`exec`]: cells and commands streamed as NDJSON events; [`agent_io`]: an agent
//!   connection read on the async runtime (a cell's responses).
//! - [`files`]: uploads and downloads, streamed both ways.
//! - [`lifecycle`]: fork, merge, snapshot, rollback.
//! - [`spaces`]: persistent spaces (persist on close, resume).
//! - [`templates`]: templates' ready snapshots; [`pool`]: warm pools restored from them.
//! - [`template_spec`], [`template_build`]: templates built over the API from a spec.
//! - [`egress`]: each sandbox's DNS resolver and domain proxy (its egress policy's names).
//! - [`snapshotd`]: the host's snapshotd, started again when it exits.
//! - [`auth`]: API keys (hashed) to tenants; [`keys`]: keys managed over the API.
//! - [`db`]: the metadata store.
//! - [`metrics`]: Prometheus metrics.
//! - [`openapi`]: the OpenAPI document, generated from the code.
//! - [`error`]: `{"error":{"code","message"}}` with its status.
//! - [`telemetry`]: logs, and spans exported over OTLP when a collector is configured.

pub mod agent_io;
pub mod app;
pub mod auth;
pub mod db;
pub mod egress;
pub mod error;
pub mod exec;
pub mod files;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod openapi;
pub mod pool;
pub mod routes;
pub mod snapshotd;
pub mod spaces;
pub mod standby;
pub mod telemetry;
pub mod template_build;
pub mod template_spec;
pub mod templates;
