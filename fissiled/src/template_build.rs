//! Templates built over the API: `POST /v1/templates` with a spec
//! ([`crate::template_spec`]) builds, for each ready shape of the daemon, a sandbox of the
//! base template (restored from the base's ready snapshot when it is made, booted
//! otherwise), writes the spec's files, installs its packages, runs its commands and its
//! warm-up, and keeps a
//! durable snapshot of it: the new template's ready snapshot. Creates of the template restore
//! it, with the template's environment under their own. Progress streams as NDJSON
//! ([`BuildEvent`]), `done` or `failed` last.
//!
//! One build runs at a time (the next waits, and says so), a tenant has one queued or running
//! (another is 409) and at most [`MAX_QUEUED_BUILDS`] wait in all (503); a build's VM takes a
//! start permit only while it starts, and counts against no tenant's quota. Its commands'
//! time limits add up to at most [`crate::template_spec::MAX_BUILD_COMMANDS_S`] per shape. A client that disconnects
//! does not stop its build: the template appears in `GET /v1/templates` when it is made. A
//! build that fails leaves nothing behind (no record, its snapshots freed).
//!
//! A template is its owner's: another tenant's names answer 404, and one tenant's names
//! never collide with another's. `DELETE /v1/templates/{name}` forgets it and frees its
//! snapshots — at once, or, while its sandboxes still read them, once they are gone
//! ([`App::free_snapshots`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::response::Response;
use fissile_proto::agent::{ExecRequest, Response as AgentResponse, ShellRequest};
use fissile_sandbox::Sandbox;
use serde::{Deserialize, Serialize};

use crate::app::{App, DEFAULT_TEMPLATE, blocking, lock};
use crate::db::{NetworkPolicy, ReadyRecord, TemplateRecord, now_ms, random_hex};
use crate::error::ApiError;
use crate::template_spec::TemplateSpec;
use crate::templates::{ReadyState, ReadyView, TemplateView, WARMUP};

/// A ready shape's key in a [`TemplateRecord`]'s snapshots (`512x1`).
fn shape_key(memory_mib: u64, vcpus: u8) -> String {
    format!("{memory_mib}x{vcpus}")
}

/// Most template builds queued or running at once (one per tenant); more answer 503.
pub const MAX_QUEUED_BUILDS: usize = 8;

/// Body of `POST /v1/templates`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildBody {
    /// The template spec (TOML): `name`, `base` (default `python-datasci`), `[apt]` and
    /// `[pip]` `packages`, `[env]`, `[[files]]` (`dest`, inline `content`, `mode`), `[[run]]`
    /// (`command`, `timeout_s`) and `warmup` (Python run in the REPL before the snapshot).
    pub spec: String,
    /// What the build's `[[run]]` commands may reach (e.g. a package index); none: no
    /// network. The template's sandboxes get their own policy at create.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
}

/// One line of a build's NDJSON progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step started (`512x1: run[0]: make data`, `512x1: pip: python3 -m pip install …`).
    Step {
        /// What it does.
        step: String,
    },
    /// Output of a command or of the warm-up.
    Stdout {
        /// The text.
        text: String,
    },
    /// Error output of a command or of the warm-up.
    Stderr {
        /// The text.
        text: String,
    },
    /// Built (last line): creates of the template now restore its snapshots.
    Done {
        /// The template.
        template: TemplateView,
        /// How long the whole build took.
        build_ms: u64,
    },
    /// The build failed (last line); nothing of it was kept.
    Failed {
        /// Why, naming the step.
        message: String,
    },
}

impl BuildEvent {
    fn line(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// The builds under way: names claimed (`tenant/name`) and the one-at-a-time permit.
#[derive(Debug)]
pub struct Builds {
    names: Mutex<HashSet<String>>,
    one: Arc<tokio::sync::Semaphore>,
}

impl Default for Builds {
    fn default() -> Self {
        Self {
            names: Mutex::default(),
            one: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl Builds {
    /// Names of `tenant`'s templates being built.
    pub fn building(&self, tenant: &str) -> Vec<String> {
        let prefix = format!("{tenant}/");
        let mut names: Vec<String> = lock(&self.names)
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        names.sort();
        names
    }
}

/// A claimed name, released when the build ends however it ends.
struct Claim {
    builds: Arc<Builds>,
    key: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.builds.names).remove(&self.key);
    }
}

/// A step's failure, said in the build's words.
fn failed(step: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("{step}: {e}"))
}

/// Sends build events from the blocking pool without ever waiting for the client: a client
/// that left is not an error (the build goes on), and one that stops reading cannot hold the
/// build up — what does not fit in the channel is dropped, counted, and said once there is
/// room again.
struct Events {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    dropped: std::cell::Cell<u64>,
}

impl Events {
    fn new(tx: tokio::sync::mpsc::Sender<Bytes>) -> Events {
        Events {
            tx,
            dropped: std::cell::Cell::new(0),
        }
    }

    fn send(&self, ev: &BuildEvent) {
        let dropped = self.dropped.get();
        if dropped > 0 {
            let note = BuildEvent::Stderr {
                text: format!(
                    "fissiled: {dropped} events of this build were dropped (the client did not \
                     read them in time)\n"
                ),
            };
            if self.tx.try_send(note.line()).is_err() {
                self.dropped.set(dropped + 1);
                return;
            }
            self.dropped.set(0);
        }
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = self.tx.try_send(ev.line()) {
            self.dropped.set(self.dropped.get() + 1);
        }
    }

    fn step(&self, step: String) {
        self.send(&BuildEvent::Step { step });
    }

    fn output(&self, r: &AgentResponse) {
        let ev = match r {
            AgentResponse::Stdout(d) => BuildEvent::Stdout {
                text: String::from_utf8_lossy(d).into_owned(),
            },
            AgentResponse::Stderr(d) => BuildEvent::Stderr {
                text: String::from_utf8_lossy(d).into_owned(),
            },
            _ => return,
        };
        self.send(&ev);
    }
}

/// Runs `code` in the REPL of `sb` with `env`, output to `events`; a raised exception is an
/// error naming `what`.
fn run_cell(
    sb: &mut Sandbox,
    code: &str,
    env: &BTreeMap<String, String>,
    what: &str,
    events: &Events,
) -> Result<(), ApiError> {
    let req = ExecRequest {
        code: code.to_string(),
        timeout_ms: Some(crate::template_spec::DEFAULT_RUN_TIMEOUT_S * 1000),
        env: env.clone(),
    };
    let agent = sb
        .agent()
        .map_err(|e| ApiError::sandbox(&format!("connecting for {what}"), &e))?;
    let mut raised = None;
    let done = agent
        .exec_streaming(&req, fissile_agent::client::exec_deadline(&req), |r| {
            if let AgentResponse::Error {
                ename,
                evalue,
                traceback,
            } = r
            {
                raised = Some(format!("{ename}: {evalue}\n{}", traceback.join("\n")));
            }
            events.output(r);
        })
        .map_err(|e| ApiError::agent(what, &e))?;
    if let Some(e) = raised {
        return Err(failed(what, format!("raised {e}")));
    }
    if done.timed_out {
        return Err(failed(
            what,
            format!(
                "did not finish in {} s",
                crate::template_spec::DEFAULT_RUN_TIMEOUT_S
            ),
        ));
    }
    Ok(())
}

impl App {
    /// Starts building `tenant`'s template from `body` and streams its progress; bad input
    /// (a spec that does not parse, a name taken) is refused before anything starts.
    pub fn build_template(&self, tenant: &str, body: BuildBody) -> Result<Response, ApiError> {
        if let Some(n) = &body.network {
            if !self.config.guest_network {
                return Err(ApiError::bad_request(
                    "network: this daemon gives sandboxes no network (--guest-network off)",
                ));
            }
            n.to_egress().map_err(ApiError::bad_request)?;
        }
        let spec = crate::template_spec::parse(&body.spec, |b| b == DEFAULT_TEMPLATE)?;
        if spec.name == DEFAULT_TEMPLATE {
            return Err(ApiError::conflict(format!(
                "{DEFAULT_TEMPLATE} is the daemon's own template; name yours otherwise"
            )));
        }
        if self.config.ready_shapes.is_empty() {
            return Err(ApiError::conflict(
                "this daemon makes no ready snapshots (--no-ready-snapshots), and a built \
                 template lives in its ready snapshots",
            ));
        }
        let key = format!("{tenant}/{}", spec.name);
        let claim = {
            let mut names = lock(&self.builds.names);
            if names.contains(&key) {
                return Err(ApiError::conflict(format!(
                    "template {} is being built",
                    spec.name
                )));
            }
            if names.iter().any(|k| k.starts_with(&format!("{tenant}/"))) {
                return Err(ApiError::conflict(
                    "one template build at a time per tenant: another of yours is queued or \
                     running",
                ));
            }
            if names.len() >= MAX_QUEUED_BUILDS {
                return Err(ApiError::unavailable(format!(
                    "{MAX_QUEUED_BUILDS} template builds are queued or running; try again later"
                )));
            }
            if self.db.template(tenant, &spec.name)?.is_some() {
                return Err(ApiError::conflict(format!(
                    "template {} exists; delete it first to build it again",
                    spec.name
                )));
            }
            names.insert(key.clone());
            Claim {
                builds: self.builds.clone(),
                key,
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let app = self.clone();
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            let name = spec.name.clone();
            let last = match app
                .run_build(&tenant, spec, body.spec, body.network, &tx)
                .await
            {
                Ok((template, build_ms)) => {
                    tracing::info!(%tenant, template = %name, build_ms, "template built");
                    BuildEvent::Done { template, build_ms }
                }
                Err(e) => {
                    tracing::warn!(%tenant, template = %name, error = %e.message,
                        "template build failed");
                    BuildEvent::Failed { message: e.message }
                }
            };
            drop(claim);
            // Bounded: a client that stopped reading does not keep this task.
            let _ = tokio::time::timeout(Duration::from_secs(30), tx.send(last.line())).await;
        });
        Ok(crate::exec::ndjson(None, rx))
    }

    async fn run_build(
        &self,
        tenant: &str,
        spec: TemplateSpec,
        text: String,
        network: Option<NetworkPolicy>,
        tx: &tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(TemplateView, u64), ApiError> {
        let t0 = Instant::now();
        let _one = match self.builds.one.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let step = BuildEvent::Step {
                    step: "waiting for another template build to end".into(),
                };
                let _ = tx.try_send(step.line());
                self.builds
                    .one
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::unavailable("the daemon is stopping"))?
            }
        };
        let spec = Arc::new(spec);
        let network = Arc::new(network);
        let mut ready = BTreeMap::new();
        for &(memory_mib, vcpus) in &self.config.ready_shapes {
            let permit = self.starts.clone().acquire_owned().await;
            let (app, spec, network) = (self.clone(), spec.clone(), network.clone());
            let events = Events::new(tx.clone());
            let made = blocking(move || {
                app.make_template_snapshot(
                    &spec,
                    (memory_mib, vcpus),
                    network.as_ref().as_ref(),
                    permit,
                    &events,
                )
            })
            .await;
            match made {
                Ok(r) => {
                    ready.insert(shape_key(memory_mib, vcpus), r);
                }
                Err(e) => {
                    self.release_snapshots(ready.values().map(|r| r.snapshot.clone()).collect())
                        .await;
                    return Err(e);
                }
            }
        }
        let record = TemplateRecord {
            name: spec.name.clone(),
            tenant: tenant.to_string(),
            base: spec.base.clone(),
            spec: text,
            env: spec.env.clone(),
            ready,
            fingerprint: self.ready_fingerprint(),
            created_ms: now_ms(),
        };
        let app = self.clone();
        let r = record.clone();
        if let Err(e) = blocking(move || Ok(app.db.put_template(&r)?)).await {
            self.release_snapshots(record.ready.values().map(|r| r.snapshot.clone()).collect())
                .await;
            return Err(e);
        }
        Ok((self.template_view(&record), t0.elapsed().as_millis() as u64))
    }

    /// One ready snapshot of a template being built, in shape (MiB, vCPUs) (blocking).
    fn make_template_snapshot(
        &self,
        spec: &TemplateSpec,
        (memory_mib, vcpus): (u64, u8),
        network: Option<&NetworkPolicy>,
        permit: Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
        events: &Events,
    ) -> Result<ReadyRecord, ApiError> {
        let t0 = Instant::now();
        let shape = shape_key(memory_mib, vcpus);
        // A short name: the VMM's sockets live in it (a Unix socket path has ~108 bytes).
        let dir = self
            .config
            .state_dir
            .join("templates")
            .join(format!("build-{}", random_hex(6)?));
        let cfg = self.sandbox_config(dir.clone(), memory_mib, vcpus, network);
        let base = crate::templates::Shape {
            template: spec.base.clone(),
            memory_mib,
            vcpus,
        };
        let made = (|| {
            let mut sb = match self.made_ready_snapshot(&base) {
                Some(snap) => {
                    events.step(format!("{shape}: restoring {}'s ready snapshot", spec.base));
                    Sandbox::restore(&cfg, &snap).or_else(|e| {
                        events.step(format!(
                            "{shape}: that failed ({}); booting {}",
                            fissile_proto::error_chain(&e),
                            spec.base
                        ));
                        let _ = std::fs::remove_dir_all(&cfg.dir);
                        Sandbox::boot(&cfg)
                    })
                }
                None => {
                    events.step(format!("{shape}: booting {}", spec.base));
                    Sandbox::boot(&cfg)
                }
            }
            .map_err(|e| ApiError::sandbox("starting the base template", &e))?;
            drop(permit);
            if !spec.files.is_empty() {
                events.step(format!("{shape}: writing {} files", spec.files.len()));
                let agent = sb
                    .agent()
                    .map_err(|e| ApiError::sandbox("connecting to write the files", &e))?;
                for (i, f) in spec.files.iter().enumerate() {
                    agent
                        .write_file(&f.dest, f.content.as_bytes(), Some(f.mode))
                        .map_err(|e| {
                            ApiError::agent(&format!("writing files[{i}] ({})", f.dest), &e)
                        })?;
                }
            }
            for r in &spec.run {
                events.step(format!("{shape}: {}: {}", r.label, r.headline()));
                let mut env = spec.env.clone();
                env.extend(r.env.clone());
                let req = ShellRequest {
                    command: r.command.clone(),
                    cwd: None,
                    env,
                    stdin: Vec::new(),
                    timeout_ms: Some(r.timeout_s * 1000),
                };
                let what = r.label.clone();
                let agent = sb
                    .agent()
                    .map_err(|e| ApiError::sandbox(&format!("connecting for {what}"), &e))?;
                let done = agent
                    .shell_streaming(&req, fissile_agent::client::shell_deadline(&req), |r| {
                        events.output(r)
                    })
                    .map_err(|e| ApiError::agent(&what, &e))?;
                if done.timed_out {
                    return Err(failed(
                        &what,
                        format!("did not finish in {} s (timeout_s)", r.timeout_s),
                    ));
                }
                match (done.exit_status, done.signal) {
                    (Some(0), _) => {}
                    (Some(code), _) => {
                        return Err(failed(&what, format!("exited with status {code}")));
                    }
                    (None, Some(sig)) => {
                        return Err(failed(&what, format!("was killed by signal {sig}")));
                    }
                    (None, None) => return Err(failed(&what, "ended without an exit status")),
                }
            }
            events.step(format!("{shape}: warming up"));
            run_cell(&mut sb, WARMUP, &spec.env, "the base warm-up", events)?;
            if let Some(w) = &spec.warmup {
                run_cell(&mut sb, w, &spec.env, "warmup", events)?;
            }
            events.step(format!("{shape}: taking the template's snapshot"));
            let snap = sb
                .snapshot(true)
                .map_err(|e| ApiError::sandbox("snapshotting the template", &e))?;
            Ok(ReadyRecord {
                snapshot: snap.id,
                created_ms: now_ms(),
                build_ms: t0.elapsed().as_millis() as u64,
            })
        })();
        let _ = std::fs::remove_dir_all(&dir);
        made
    }

    /// Frees `snapshots` on the blocking pool (those still in use are freed later: see
    /// [`App::free_snapshots`]).
    async fn release_snapshots(&self, snapshots: Vec<String>) {
        if snapshots.is_empty() {
            return;
        }
        let app = self.clone();
        let _ = blocking(move || {
            app.free_snapshots(&snapshots);
            Ok(())
        })
        .await;
    }

    /// One view per ready shape of the daemon, its snapshot's state from `state` (built
    /// templates have no warm pool).
    fn shape_views(&self, state: impl Fn(u64, u8) -> Option<ReadyState>) -> Vec<ReadyView> {
        self.config
            .ready_shapes
            .iter()
            .map(|&(memory_mib, vcpus)| ReadyView {
                memory_mib,
                vcpus,
                snapshot: state(memory_mib, vcpus),
                warm: 0,
            })
            .collect()
    }

    /// `tenant`'s template `name`, as the API shows it.
    pub fn template_view(&self, record: &TemplateRecord) -> TemplateView {
        let ready = self.shape_views(|memory_mib, vcpus| {
            record
                .ready
                .get(&shape_key(memory_mib, vcpus))
                .map(|r| ReadyState::Ready {
                    build_ms: r.build_ms,
                    created_ms: r.created_ms,
                })
        });
        TemplateView {
            name: record.name.clone(),
            base: Some(record.base.clone()),
            ready,
        }
    }

    /// The views of `tenant`'s built templates and of those being built.
    pub fn built_templates(&self, tenant: &str) -> Result<Vec<TemplateView>, ApiError> {
        let mut out: Vec<TemplateView> = self
            .db
            .templates()?
            .into_iter()
            .filter(|t| t.tenant == tenant)
            .map(|t| self.template_view(&t))
            .collect();
        for name in self.builds.building(tenant) {
            if out.iter().any(|t| t.name == name) {
                continue;
            }
            out.push(TemplateView {
                name,
                base: None,
                ready: self.shape_views(|_, _| Some(ReadyState::Building)),
            });
        }
        Ok(out)
    }

    /// The snapshot a create of `tenant`'s built template `name` in shape (MiB, vCPUs)
    /// restores, and the template's environment. 404 for no such template (of this tenant),
    /// 400 for a shape it was not built in, 409 when the daemon runs other images now.
    pub fn built_template_start(
        &self,
        tenant: &str,
        name: &str,
        memory_mib: u64,
        vcpus: u8,
    ) -> Result<(String, BTreeMap<String, String>), ApiError> {
        let t = self
            .db
            .template(tenant, name)?
            .ok_or_else(|| ApiError::not_found(format!("no template {name}")))?;
        if t.fingerprint != self.ready_fingerprint() {
            return Err(ApiError::conflict(format!(
                "template {name} was built on a kernel, root image or VMM this daemon no \
                 longer runs; delete it and build it again"
            )));
        }
        let r = t.ready.get(&shape_key(memory_mib, vcpus)).ok_or_else(|| {
            let shapes: Vec<&str> = t.ready.keys().map(String::as_str).collect();
            ApiError::bad_request(format!(
                "template {name} is made for memory_mib x vcpus {} only, not \
                     {memory_mib}x{vcpus}",
                shapes.join(", ")
            ))
        })?;
        Ok((r.snapshot.clone(), t.env))
    }

    /// Forgets `tenant`'s template `name` and frees its snapshots; its running sandboxes
    /// go on. A template being built answers 409.
    pub async fn delete_template(&self, tenant: &str, name: &str) -> Result<(), ApiError> {
        if name == DEFAULT_TEMPLATE {
            return Err(ApiError::conflict(format!(
                "{DEFAULT_TEMPLATE} is the daemon's own template"
            )));
        }
        if lock(&self.builds.names).contains(&format!("{tenant}/{name}")) {
            return Err(ApiError::conflict(format!(
                "template {name} is being built; delete it when its build has ended"
            )));
        }
        let app = self.clone();
        let (t, n) = (tenant.to_string(), name.to_string());
        let record = blocking(move || {
            let r = app
                .db
                .template(&t, &n)?
                .ok_or_else(|| ApiError::not_found(format!("no template {n}")))?;
            app.db.remove_template(&t, &n)?;
            Ok(r)
        })
        .await?;
        self.release_snapshots(record.ready.values().map(|r| r.snapshot.clone()).collect())
            .await;
        tracing::info!(%tenant, template = %name, "template deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_does_not_read_loses_events_never_holds_the_build_up() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let events = Events::new(tx);
        for i in 0..5 {
            // Returns at once although nobody reads: 2 fit, 3 are dropped.
            events.step(format!("step {i}"));
        }
        assert_eq!(events.dropped.get(), 3);
        let line = |b: Bytes| -> serde_json::Value { serde_json::from_slice(&b).unwrap() };
        assert_eq!(line(rx.try_recv().unwrap())["step"], "step 0");
        assert_eq!(line(rx.try_recv().unwrap())["step"], "step 1");
        events.step("step 5".into());
        let note = line(rx.try_recv().unwrap());
        assert_eq!(note["type"], "stderr");
        assert!(
            note["text"].as_str().unwrap().contains("3 events"),
            "{note}"
        );
        assert_eq!(line(rx.try_recv().unwrap())["step"], "step 5");
        assert_eq!(events.dropped.get(), 0);
    }

    #[test]
    fn events_are_tagged_lines() {
        let line = BuildEvent::Step {
            step: "512x1: warming up".into(),
        }
        .line();
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "step");
        assert_eq!(v["step"], "512x1: warming up");
    }
}
