//! The OpenAPI document of the v1 API, generated from the handlers and types (utoipa). It
//! is served at `GET /openapi.json` and checked in as `fissiled/openapi.json`; a test fails
//! when the two differ (regenerate with `fissiled openapi > fissiled/openapi.json`).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{error, exec, files, keys, lifecycle, routes, template_build};

/// The API's document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Fissile",
        description = "Sandboxes for AI agents: persistent Python REPLs in microVMs that fork, merge, roll back and persist.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::healthz,
        routes::create,
        routes::list,
        routes::get_one,
        routes::set_network,
        routes::get_network,
        routes::delete_one,
        routes::exec_cell,
        routes::run_command,
        routes::interrupt,
        routes::put_file,
        routes::get_file,
        routes::delete_file,
        routes::list_files,
        routes::fork,
        routes::merge_into,
        routes::snapshot,
        routes::rollback,
        routes::list_spaces,
        routes::get_space,
        routes::delete_space,
        routes::resume_space,
        routes::list_templates,
        routes::build_template,
        routes::delete_template,
        keys::create_key,
        keys::list_keys,
        keys::revoke_key,
    ),
    components(schemas(
        error::ErrorBody,
        error::ErrorDetail,
        exec::ExecEvent,
        exec::CommandEvent,
        files::EntryView,
        lifecycle::ForkChild,
        keys::CreateKeyBody,
        keys::KeyView,
        keys::NewKeyView,
        template_build::BuildEvent,
    )),
    modifiers(&Security),
    tags(
        (name = "sandboxes", description = "Create, list, close"),
        (name = "execution", description = "Python cells and commands, streamed as NDJSON"),
        (name = "files", description = "Files in a sandbox, streamed both ways"),
        (name = "lifecycle", description = "Fork, merge, snapshot, rollback"),
        (name = "spaces", description = "Persistent spaces"),
        (name = "templates", description = "Templates, their ready snapshots, and templates built from a spec"),
        (name = "keys", description = "API keys (admin keys only)"),
        (name = "daemon", description = "The daemon itself"),
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_document_matches_the_code() {
        let checked_in = include_str!("../openapi.json");
        assert!(
            checked_in == super::json(),
            "fissiled/openapi.json is stale: regenerate it with \
             `fissiled openapi > fissiled/openapi.json`"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(&super::json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/healthz",
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/commands",
            "/v1/sandboxes/{id}/interrupt",
            "/v1/sandboxes/{id}/files",
            "/v1/sandboxes/{id}/files/list",
            "/v1/sandboxes/{id}/fork",
            "/v1/sandboxes/{id}/merge_into/{winner}",
            "/v1/sandboxes/{id}/snapshot",
            "/v1/sandboxes/{id}/rollback/{snapshot}",
            "/v1/spaces",
            "/v1/spaces/{id}",
            "/v1/spaces/{id}/resume",
            "/v1/keys",
            "/v1/keys/{id}",
        ] {
            assert!(paths.contains_key(p), "{p} is not in the document");
        }
    }
}
