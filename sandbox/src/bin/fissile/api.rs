//! The API subcommands: a `fissiled` driven over its public HTTP API, nothing else (the same
//! routes and error shape the Python SDK uses; `fissiled/openapi.json` documents them).
//!
//! Every wait is bounded: connecting takes at most [`CONNECT_TIMEOUT`], a lifecycle call
//! (create, fork, merge, resume...) at most `--call-timeout-s` in all, and a streamed exec or
//! command at most its own time limit plus [`STREAM_GRACE`] (the daemon interrupts a cell or
//! kills a command at its limit, so the stream ends before that).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// The longest a TCP connect to the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its own time limit a streamed exec or command may take in all.
const STREAM_GRACE: Duration = Duration::from_secs(60);
/// The longest NDJSON line the CLI accepts from the daemon (a PNG result is one line).
const MAX_EVENT_LINE: u64 = 64 << 20;
/// The longest error body read from the daemon.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// Where the daemon is and who we are.
#[derive(Debug, Args)]
#[command(next_help_heading = "Daemon")]
pub struct ApiOpts {
    /// The daemon's base URL.
    #[arg(
        long,
        global = true,
        env = "FISSILE_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// The API key (from `fissiled keys create`).
    #[arg(long, global = true, env = "FISSILE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The longest a lifecycle call (create, fork, merge, resume, rm...) may take, in seconds.
    #[arg(long, global = true, default_value_t = 600)]
    call_timeout_s: u64,
    /// Print the daemon's JSON answers instead of tables and ids.
    #[arg(long, global = true)]
    json: bool,
}

impl ApiOpts {
    /// A client for this daemon and key.
    pub fn client(&self) -> anyhow::Result<Client> {
        let base = self.url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url / FISSILE_API_URL must start with http:// or https://, got {base:?}");
        }
        Ok(Client {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(CONNECT_TIMEOUT)
                .build(),
            base,
            key: self.api_key.clone().filter(|k| !k.is_empty()),
            call_timeout: Duration::from_secs(self.call_timeout_s.max(1)),
        })
    }
}

/// One daemon, one key.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    key: Option<String>,
    call_timeout: Duration,
}

impl Client {
    fn request(&self, method: &str, path: &str, deadline: Duration) -> ureq::Request {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .timeout(deadline);
        match &self.key {
            Some(k) => req.set("Authorization", &format!("Bearer {k}")),
            None => req,
        }
    }

    /// Sends `body` (JSON, if any) and returns the answer, or the daemon's error as an error.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Duration,
    ) -> anyhow::Result<ureq::Response> {
        let req = self.request(method, path, deadline);
        let sent = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match sent {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => {
                Err(self.api_error(method, path, status, resp))
            }
            Err(ureq::Error::Transport(t)) => {
                let cause = std::error::Error::source(&t)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                Err(anyhow::anyhow!(
                    "{method} {path}: no answer from fissiled at {} ({}{cause})",
                    self.base,
                    t.kind()
                ))
            }
        }
    }

    /// `{"error":{"code","message"}}` as one line; a hint when the key is missing or refused.
    fn api_error(
        &self,
        method: &str,
        path: &str,
        status: u16,
        resp: ureq::Response,
    ) -> anyhow::Error {
        let mut text = String::new();
        let _ = resp
            .into_reader()
            .take(MAX_ERROR_BODY)
            .read_to_string(&mut text);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let detail = match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            _ => format!("HTTP {status}: {}", text.trim()),
        };
        let hint = match (status, &self.key) {
            (401, None) => " (no API key: set FISSILE_API_KEY or pass --api-key)",
            (401, Some(_)) => " (the daemon refused this API key)",
            _ => "",
        };
        anyhow::anyhow!("{method} {path}: {detail}{hint}")
    }

    /// A lifecycle call: JSON in, JSON out (`Null` for an empty answer such as 204).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let resp = self.send(method, path, body, self.call_timeout)?;
        let mut text = String::new();
        resp.into_reader()
            .take(MAX_EVENT_LINE)
            .read_to_string(&mut text)
            .with_context(|| format!("{method} {path}: reading the answer"))?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: the answer is not JSON"))
    }

    /// A streamed call: each NDJSON event to `on_event`, in order, until the stream ends.
    fn stream(
        &self,
        path: &str,
        body: &Value,
        deadline: Duration,
        mut on_event: impl FnMut(&Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let resp = self.send("POST", path, Some(body), deadline)?;
        let mut reader = BufReader::new(resp.into_reader());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_EVENT_LINE)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("POST {path}: reading the stream"))?;
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') && n as u64 == MAX_EVENT_LINE {
                bail!("POST {path}: an event longer than {MAX_EVENT_LINE} bytes");
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(&line)
                .with_context(|| format!("POST {path}: an event that is not JSON"))?;
            on_event(&event)?;
        }
    }
}

/// `KEY=VALUE` on the command line.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn to_map(pairs: &[(String, String)]) -> BTreeMap<&str, &str> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A path segment: the ids the daemon hands out are URL-safe; anything else is refused here
/// rather than sent somewhere unexpected.
fn segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id == "."
        || id == ".."
    {
        bail!("{id:?} is not an id");
    }
    Ok(id)
}

/// Percent-encodes a query value.
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// "3s", "5m", "2h", "4d": how long ago `ms` (since the epoch) was.
fn age(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "-".to_string();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The elements of a JSON array (none if `v` is not one).
fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Deletes each of `ids` under `collection` (`/v1/<collection>/<id>`), printing the ones
/// deleted and the errors of the others; fails if any was not deleted.
fn delete_each(c: &Client, collection: &str, ids: &[String]) -> anyhow::Result<()> {
    let mut failed = 0;
    for id in ids {
        let path = format!("/v1/{collection}/{}", segment(id)?);
        match c.call("DELETE", &path, None) {
            Ok(_) => println!("{id}"),
            Err(e) => {
                eprintln!("fissile: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} not deleted", ids.len());
    }
    Ok(())
}

/// Writes a `stdout` or `stderr` event of a stream where it belongs; false for any other.
fn echo_output(out: &mut impl Write, ev: &Value) -> anyhow::Result<bool> {
    match ev["type"].as_str() {
        Some("stdout") => {
            out.write_all(text(&ev["text"]).as_bytes())?;
            out.flush()?;
        }
        Some("stderr") => eprint!("{}", text(&ev["text"])),
        _ => return Ok(false),
    }
    Ok(true)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as aligned columns under `header`.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn labels(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    }
}

#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox and print its id.
    Create(Box<CreateArgs>),
    /// List your sandboxes.
    Ls {
        /// Only sandboxes with this label (repeatable: all must match).
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
        metadata: Vec<(String, String)>,
    },
    /// Show one sandbox (JSON).
    Show { id: String },
    /// Delete sandboxes (a persistent one persists into its space first).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The template (default: the daemon's, `python-datasci`).
    #[arg(long)]
    template: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// vCPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Keep its state in a space that outlives it (`fissile spaces resume`).
    #[arg(long)]
    persistent: bool,
    /// Seconds without a request before it is persisted (persistent) or deleted.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// A label (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// An environment variable for its cells and commands (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Start from this snapshot (`fissile snapshot`) instead of the template.
    #[arg(long)]
    from_snapshot: Option<String>,
    #[command(flatten)]
    network: NetworkArgs,
}

/// An egress policy on the command line (none of these: no policy).
#[derive(Debug, Default, Args)]
pub struct NetworkArgs {
    /// No internet: the guest reaches only the `--allow` networks.
    #[arg(long)]
    no_internet: bool,
    /// Only these IPv4 networks (`a.b.c.d[/len]`, repeatable).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Never these IPv4 networks (repeatable).
    #[arg(long, value_name = "CIDR")]
    deny: Vec<String>,
    /// These domains resolve and HTTP/TLS for them passes (`example.com`, `*.example.com`;
    /// repeatable); no other name resolves.
    #[arg(long, value_name = "DOMAIN")]
    allow_domain: Vec<String>,
    /// These domains never resolve and no HTTP/TLS connection may be for them (repeatable).
    #[arg(long, value_name = "DOMAIN")]
    deny_domain: Vec<String>,
}

impl CreateArgs {
    fn body(&self) -> Value {
        let mut body = json!({
            "metadata": to_map(&self.metadata),
            "env": to_map(&self.env),
            "persistent": self.persistent,
        });
        let fields = [
            ("template", self.template.clone().map(Value::from)),
            ("memory_mib", self.memory_mib.map(Value::from)),
            ("vcpus", self.vcpus.map(Value::from)),
            ("idle_timeout_s", self.idle_timeout_s.map(Value::from)),
            ("from_snapshot", self.from_snapshot.clone().map(Value::from)),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                body[name] = v;
            }
        }
        if let Some(policy) = self.network.policy() {
            body["network"] = policy;
        }
        body
    }
}

impl NetworkArgs {
    /// The policy's JSON, if any flag was given.
    fn policy(&self) -> Option<Value> {
        if !self.no_internet
            && self.allow.is_empty()
            && self.deny.is_empty()
            && self.allow_domain.is_empty()
            && self.deny_domain.is_empty()
        {
            return None;
        }
        let mut policy = json!({
            "internet": !self.no_internet,
            "allow": self.allow,
            "deny": self.deny,
        });
        if !self.allow_domain.is_empty() {
            policy["allow_domains"] = json!(self.allow_domain);
        }
        if !self.deny_domain.is_empty() {
            policy["deny_domains"] = json!(self.deny_domain);
        }
        Some(policy)
    }
}

pub fn sandbox(c: &Client, opts: &ApiOpts, cmd: SandboxCmd) -> anyhow::Result<()> {
    match cmd {
        SandboxCmd::Create(args) => {
            let v = c.call("POST", "/v1/sandboxes", Some(&args.body()))?;
            if opts.json {
                return print_json(&v);
            }
            println!("{}", text(&v["id"]));
            if let Some(space) = v["space_id"].as_str() {
                eprintln!("fissile: space {space}");
            }
            Ok(())
        }
        SandboxCmd::Ls { metadata } => {
            let query: Vec<String> = metadata
                .iter()
                .map(|(k, v)| format!("metadata.{}={}", query_value(k), query_value(v)))
                .collect();
            let path = if query.is_empty() {
                "/v1/sandboxes".to_string()
            } else {
                format!("/v1/sandboxes?{}", query.join("&"))
            };
            let v = c.call("GET", &path, None)?;
            if opts.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|s| {
                    vec![
                        text(&s["id"]),
                        text(&s["state"]),
                        text(&s["template"]),
                        format!("{}x{}", text(&s["memory_mib"]), text(&s["vcpus"])),
                        text(&s["space_id"]),
                        age(s["created_at_ms"].as_u64()),
                        labels(&s["metadata"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID", "STATE", "TEMPLATE", "MIBxCPU", "SPACE", "AGE", "METADATA",
                ],
                &rows,
            );
            Ok(())
        }
        SandboxCmd::Show { id } => {
            print_json(&c.call("GET", &format!("/v1/sandboxes/{}", segment(&id)?), None)?)
        }
        SandboxCmd::Rm { ids } => delete_each(c, "sandboxes", &ids),
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The sandbox.
    id: String,
    /// The cell's code; `-` reads it from stdin.
    #[arg(short = 'c', long = "code", conflicts_with = "file")]
    code: Option<String>,
    /// Read the cell from this file.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Interrupt the cell after this many seconds (its state stays).
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// An environment variable for this cell only (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Print the `done` event's figures (execution count, guest and server time) to stderr.
    #[arg(short = 'v', long)]
    verbose: bool,
}

/// The stream's deadline for a daemon-side limit of `timeout_s`.
fn stream_deadline(timeout_s: f64) -> anyhow::Result<Duration> {
    if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= 86400.0) {
        bail!("--timeout-s must be in (0, 86400], got {timeout_s}");
    }
    Ok(Duration::from_secs_f64(timeout_s) + STREAM_GRACE)
}

fn read_code(args: &ExecArgs) -> anyhow::Result<String> {
    match (&args.code, &args.file) {
        (Some(c), _) if c == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the cell from stdin")?;
            Ok(s)
        }
        (Some(c), _) => Ok(c.clone()),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
        }
        (None, None) => bail!("give the cell with -c CODE, -c - (stdin) or -f FILE"),
    }
}

/// Streams a cell's events: stdout and stderr as they come, results as text (other MIME
/// types as a note), a traceback on stderr. Exit 1 when the cell raised or timed out.
pub fn exec(c: &Client, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let deadline = stream_deadline(args.timeout_s)?;
    let body = json!({
        "code": read_code(args)?,
        "timeout_s": args.timeout_s,
        "env": to_map(&args.env),
    });
    let path = format!("/v1/sandboxes/{}/exec", segment(&args.id)?);
    let mut code = None;
    let mut out = std::io::stdout().lock();
    c.stream(&path, &body, deadline, |ev| {
        if echo_output(&mut out, ev)? {
            return Ok(());
        }
        match ev["type"].as_str() {
            Some("result") => {
                let data = &ev["data"];
                match data["text/plain"].as_str() {
                    Some(t) => writeln!(out, "{t}")?,
                    None => {
                        let kinds: Vec<&str> = data
                            .as_object()
                            .map(|m| m.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        writeln!(out, "[{}]", kinds.join(", "))?;
                    }
                }
                for (mime, v) in data.as_object().into_iter().flatten() {
                    if mime != "text/plain" {
                        eprintln!("fissile: a {mime} result ({} bytes)", text(v).len());
                    }
                }
                out.flush()?;
            }
            Some("error") if ev.get("traceback").is_some() => {
                let tb: Vec<String> = ev["traceback"]
                    .as_array()
                    .map(|a| a.iter().map(text).collect())
                    .unwrap_or_default();
                if tb.is_empty() {
                    eprintln!("{}: {}", text(&ev["name"]), text(&ev["value"]));
                } else {
                    eprintln!("{}", tb.join("\n"));
                }
                code = Some(ExitCode::FAILURE);
            }
            Some("error") => bail!("the daemon ended the cell: {}", text(&ev["message"])),
            Some("done") => {
                if ev["timed_out"].as_bool() == Some(true) {
                    eprintln!(
                        "fissile: the cell was interrupted at its {}s limit",
                        args.timeout_s
                    );
                    code = Some(ExitCode::FAILURE);
                }
                if ev["state_lost"].as_bool() == Some(true) {
                    eprintln!("fissile: the sandbox's Python state was lost (the REPL restarted)");
                    code = Some(ExitCode::FAILURE);
                }
                if args.verbose {
                    eprintln!(
                        "fissile: [{}] {} ms in the guest, {} ms in the daemon",
                        text(&ev["execution_count"]),
                        text(&ev["duration_ms"]),
                        text(&ev["server_ms"])
                    );
                }
                code.get_or_insert(ExitCode::SUCCESS);
            }
            _ => {}
        }
        Ok(())
    })?;
    code.context("the stream ended without a `done` event")
}

#[derive(Debug, Args)]
pub struct ShArgs {
    /// The sandbox.
    id: String,
    /// The command line, run by `/bin/sh -c`.
    cmd: String,
    /// Its working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Kill it after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// An environment variable for it (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
}

/// Streams a command's output; its exit code becomes ours (128+signal if a signal killed it,
/// 124 if it timed out, as `timeout(1)` does).
pub fn sh(c: &Client, args: &ShArgs) -> anyhow::Result<ExitCode> {
    let deadline = stream_deadline(args.timeout_s)?;
    let mut body = json!({
        "cmd": args.cmd,
        "timeout_s": args.timeout_s,
        "env": to_map(&args.env),
    });
    if let Some(cwd) = &args.cwd {
        body["cwd"] = Value::from(cwd.as_str());
    }
    let path = format!("/v1/sandboxes/{}/commands", segment(&args.id)?);
    let mut code = None;
    let mut out = std::io::stdout().lock();
    c.stream(&path, &body, deadline, |ev| {
        if echo_output(&mut out, ev)? {
            return Ok(());
        }
        match ev["type"].as_str() {
            Some("exit") => {
                let status = if ev["timed_out"].as_bool() == Some(true) {
                    eprintln!(
                        "fissile: the command was killed at its {}s limit",
                        args.timeout_s
                    );
                    124
                } else if let Some(sig) = ev["signal"].as_i64() {
                    128 + sig
                } else {
                    ev["exit_code"].as_i64().unwrap_or(1)
                };
                code = Some(ExitCode::from(u8::try_from(status).unwrap_or(1)));
            }
            Some("error") => bail!("the daemon ended the command: {}", text(&ev["message"])),
            _ => {}
        }
        Ok(())
    })?;
    code.context("the stream ended without an `exit` event")
}

pub fn fork(c: &Client, opts: &ApiOpts, id: &str, n: u32) -> anyhow::Result<()> {
    let path = format!("/v1/sandboxes/{}/fork", segment(id)?);
    let v = c.call("POST", &path, Some(&json!({ "n": n })))?;
    if opts.json {
        return print_json(&v);
    }
    let mut failed = 0;
    for child in items(&v["children"]) {
        match child["id"].as_str() {
            Some(id) => println!("{id}"),
            None => {
                eprintln!("fissile: a child failed: {}", text(&child["error"]));
                failed += 1;
            }
        }
    }
    eprintln!("fissile: fork({n}) in {} ms", text(&v["total_ms"]));
    if failed > 0 {
        bail!("{failed} of {n} children failed");
    }
    Ok(())
}

pub fn merge(c: &Client, parent: &str, winner: &str) -> anyhow::Result<()> {
    let path = format!(
        "/v1/sandboxes/{}/merge_into/{}",
        segment(parent)?,
        segment(winner)?
    );
    c.call("POST", &path, None)?;
    eprintln!("fissile: {parent} now holds {winner}'s state");
    Ok(())
}

pub fn snapshot(c: &Client, opts: &ApiOpts, id: &str) -> anyhow::Result<()> {
    let v = c.call(
        "POST",
        &format!("/v1/sandboxes/{}/snapshot", segment(id)?),
        None,
    )?;
    if opts.json {
        return print_json(&v);
    }
    println!("{}", text(&v["snapshot_id"]));
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum SpacesCmd {
    /// List your spaces.
    Ls,
    /// Show one space (JSON).
    Show { id: String },
    /// Start a sandbox from a persisted space; prints the sandbox's id.
    Resume { id: String },
    /// Delete spaces (and their stored state).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub fn spaces(c: &Client, opts: &ApiOpts, cmd: SpacesCmd) -> anyhow::Result<()> {
    match cmd {
        SpacesCmd::Ls => {
            let v = c.call("GET", "/v1/spaces", None)?;
            if opts.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|s| {
                    vec![
                        text(&s["space_id"]),
                        text(&s["state"]),
                        text(&s["sandbox_id"]),
                        text(&s["template"]),
                        age(s["persisted_at_ms"].as_u64()),
                        labels(&s["metadata"]),
                    ]
                })
                .collect();
            table(
                &[
                    "SPACE",
                    "STATE",
                    "SANDBOX",
                    "TEMPLATE",
                    "PERSISTED",
                    "METADATA",
                ],
                &rows,
            );
            Ok(())
        }
        SpacesCmd::Show { id } => {
            print_json(&c.call("GET", &format!("/v1/spaces/{}", segment(&id)?), None)?)
        }
        SpacesCmd::Resume { id } => {
            let path = format!("/v1/spaces/{}/resume", segment(&id)?);
            let v = c.call("POST", &path, None)?;
            if opts.json {
                return print_json(&v);
            }
            println!("{}", text(&v["id"]));
            Ok(())
        }
        SpacesCmd::Rm { ids } => delete_each(c, "spaces", &ids),
    }
}

#[derive(Debug, Subcommand)]
pub enum TemplatesCmd {
    /// List the templates, the state of their ready snapshots and their warm pools.
    Ls,
    /// Build a template from a spec and show its progress: TOML with `name`, `base`
    /// (default python-datasci), `[apt]`/`[pip]` `packages`, `[env]`, `[[files]]` (`dest`,
    /// inline `content`, `mode`), `[[run]]` (`command`, `timeout_s`) and `warmup` (Python
    /// run before the snapshot).
    /// The network flags say what the build's commands may reach (default: nothing).
    Build {
        /// The spec file (`-`: stdin).
        spec: PathBuf,
        #[command(flatten)]
        network: NetworkArgs,
    },
    /// Delete templates you built (their sandboxes run on).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// How long a template build's stream may last: a spec's commands have 4 h in all (the
/// daemon refuses more), per ready shape, and a build may queue behind others.
const BUILD_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Builds a template, its steps on a spinner (plain lines when stderr is not a terminal),
/// its commands' output as it comes; fails when the build does.
fn build_template(
    c: &Client,
    opts: &ApiOpts,
    spec: &Path,
    network: &NetworkArgs,
) -> anyhow::Result<()> {
    let spec_text = if spec == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the spec from stdin")?;
        s
    } else {
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?
    };
    let mut body = json!({ "spec": spec_text });
    if let Some(policy) = network.policy() {
        body["network"] = policy;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed:>4}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut last = None;
    c.stream("/v1/templates", &body, BUILD_DEADLINE, |ev| {
        match ev["type"].as_str() {
            Some("step") => {
                let step = text(&ev["step"]);
                say(format!("==> {step}"));
                bar.set_message(step);
            }
            Some("stdout" | "stderr") => {
                for line in text(&ev["text"]).lines() {
                    say(format!("    {line}"));
                }
            }
            Some("done" | "failed") => last = Some(ev.clone()),
            _ => {}
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let last = last.context("the stream ended without `done` or `failed`")?;
    if last["type"] == "failed" {
        bail!("the build failed: {}", text(&last["message"]));
    }
    if opts.json {
        return print_json(&last["template"]);
    }
    println!(
        "{} built in {} ms",
        text(&last["template"]["name"]),
        text(&last["build_ms"])
    );
    Ok(())
}

pub fn templates(c: &Client, opts: &ApiOpts, cmd: TemplatesCmd) -> anyhow::Result<()> {
    match cmd {
        TemplatesCmd::Build { spec, network } => build_template(c, opts, &spec, &network),
        TemplatesCmd::Rm { names } => delete_each(c, "templates", &names),
        TemplatesCmd::Ls => {
            let v = c.call("GET", "/v1/templates", None)?;
            if opts.json {
                return print_json(&v);
            }
            let mut rows = Vec::new();
            for t in items(&v) {
                let ready = items(&t["ready"]);
                if ready.is_empty() {
                    rows.push(vec![
                        text(&t["name"]),
                        "-".into(),
                        "none".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
                for r in ready {
                    let snap = &r["snapshot"];
                    let detail = match snap["status"].as_str() {
                        Some("ready") => format!(
                            "made in {} ms, {} ago",
                            text(&snap["build_ms"]),
                            age(snap["created_ms"].as_u64())
                        ),
                        Some("failed") => text(&snap["message"]),
                        _ => "-".into(),
                    };
                    rows.push(vec![
                        text(&t["name"]),
                        format!("{}x{}", text(&r["memory_mib"]), text(&r["vcpus"])),
                        text(&snap["status"]),
                        text(&r["warm"]),
                        detail,
                    ]);
                }
            }
            table(&["TEMPLATE", "MIBxCPU", "READY", "WARM", "DETAIL"], &rows);
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key for TENANT and print it (once: only its hash is stored). Over the API
    /// with an admin key; with `--state-dir`, in a stopped daemon's store.
    Create {
        #[arg(long)]
        tenant: String,
        /// The new key may manage keys too.
        #[arg(long)]
        admin: bool,
        /// A stopped daemon's state directory (runs `fissiled keys create`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// List the keys that are not revoked (ids, never the keys), with an admin key.
    Ls,
    /// Revoke a key: its id (`key_…`, from `keys ls`) over the API with an admin key; or,
    /// with `--state-dir`, its id or the key itself in a stopped daemon's store.
    Revoke {
        key: String,
        /// A stopped daemon's state directory (runs `fissiled keys revoke`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// Keys over the API (an admin key), or with `--state-dir` in a stopped daemon's store.
pub fn keys(opts: &ApiOpts, cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            tenant,
            admin,
            state_dir: Some(dir),
        } => {
            let mut args = vec!["create".into(), "--tenant".into(), tenant];
            if admin {
                args.push("--admin".into());
            }
            offline_keys(&args, &dir)
        }
        KeysCmd::Revoke {
            key,
            state_dir: Some(dir),
        } => offline_keys(&["revoke".into(), "--key".into(), key], &dir),
        KeysCmd::Create {
            tenant,
            admin,
            state_dir: None,
        } => {
            let body = json!({ "tenant": tenant, "admin": admin });
            let v = opts.client()?.call("POST", "/v1/keys", Some(&body))?;
            if opts.json {
                print_json(&v)?;
            } else {
                println!("{}", text(&v["key"]));
                eprintln!(
                    "fissile: key {} for tenant {}: shown once, store it now",
                    text(&v["id"]),
                    text(&v["tenant"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Ls => {
            let v = opts.client()?.call("GET", "/v1/keys", None)?;
            if opts.json {
                print_json(&v)?;
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = items(&v)
                .iter()
                .map(|k| {
                    let admin = if k["admin"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        ""
                    };
                    vec![
                        text(&k["id"]),
                        text(&k["tenant"]),
                        admin.to_string(),
                        age(k["created_at_ms"].as_u64()),
                    ]
                })
                .collect();
            table(&["KEY ID", "TENANT", "ADMIN", "CREATED"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Revoke {
            key,
            state_dir: None,
        } => {
            if key.starts_with("fsk_") {
                bail!(
                    "give the key's id (`fissile keys ls`), not the key itself: a key never \
                     goes into a URL"
                );
            }
            delete_each(&opts.client()?, "keys", &[key])?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `fissiled keys <args> --state-dir <dir>` (found next to this program, in
/// `$FISSILE_BIN_DIR` or on `PATH`) with our stdout and stderr.
fn offline_keys(args: &[String], dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let bin = fissile_sandbox::paths::find_binary("fissiled")?;
    let status = std::process::Command::new(&bin)
        .arg("keys")
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_leave_their_route_are_refused() {
        assert_eq!(segment("sb-1a2B_3.c").unwrap(), "sb-1a2B_3.c");
        for bad in ["", ".", "..", "a/b", "a?b", "a b", "a%2f", "é"] {
            assert!(segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(query_value("job-1_x.~"), "job-1_x.~");
    }

    #[test]
    fn key_value_needs_a_key() {
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(key_value("=b").is_err());
        assert!(key_value("ab").is_err());
    }

    #[test]
    fn create_body_sends_only_what_was_given() {
        let args = CreateArgs {
            template: None,
            memory_mib: Some(640),
            vcpus: None,
            persistent: true,
            idle_timeout_s: None,
            metadata: vec![("job".into(), "etl".into())],
            env: vec![],
            from_snapshot: None,
            network: NetworkArgs {
                no_internet: true,
                allow: vec!["10.0.0.0/8".into()],
                deny: vec![],
                allow_domain: vec!["pypi.org".into()],
                deny_domain: vec![],
            },
        };
        assert_eq!(NetworkArgs::default().policy(), None);
        assert_eq!(
            args.body(),
            json!({
                "metadata": {"job": "etl"}, "env": {}, "persistent": true, "memory_mib": 640,
                "network": {"internet": false, "allow": ["10.0.0.0/8"], "deny": [],
                            "allow_domains": ["pypi.org"]},
            })
        );
    }

    #[test]
    fn stream_bound_follows_the_time_limit() {
        assert_eq!(stream_deadline(1.5).unwrap(), Duration::from_millis(61_500));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 86401.0] {
            assert!(stream_deadline(bad).is_err(), "{bad}");
        }
    }
}
