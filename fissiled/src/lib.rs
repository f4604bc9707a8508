//! fissiled: the one daemon per host that Fissile's users talk to, over an HTTP API (axum on
//! tokio). It owns snapshotd and every VMM process on its host (through `fissile-sandbox`),
//! keeps tenants, keys and sandboxes in an embedded transactional store (redb), and streams
//! cell output as NDJSON.
//!
//! - [`routes`]: the HTTP surface (parse, authorize, call the service; the error shape).
//! - [`app`]: the service that owns the running sandboxes; blocking work on the blocking pool.
//! - [`exec`]: cells streamed as NDJSON events.
//! - [`auth`]: API keys (hashed) to tenants.
//! - [`db`]: the metadata store.
//! - [`error`]: `{"error":{"code","message"}}` with its status.

pub mod app;
pub mod auth;
pub mod db;
pub mod error;
pub mod exec;
pub mod routes;
