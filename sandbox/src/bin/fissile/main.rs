//! `fissile`: Fissile sandboxes from the command line.
//!
//! Over a `fissiled`'s HTTP API (`FISSILE_API_URL`, default `http://127.0.0.1:8080`, and
//! `FISSILE_API_KEY`, as the Python SDK reads them):
//! ```text
//! id=$(fissile sandbox create --metadata job=etl)   # prints the new sandbox's id
//! fissile exec "$id" -c 'x = 41' && fissile exec "$id" -c 'x + 1'   # streams; prints 42
//! fissile sh "$id" 'ls /tmp'                       # a shell command, its exit code
//! fissile fork "$id" -n 3                          # the children's ids, a line each
//! fissile merge "$id" CHILD                        # the parent adopts CHILD's state
//! fissile sandbox ls | fissile spaces ls | fissile templates ls|build|rm
//! fissile sandbox rm "$id"
//! fissile keys create --tenant acme      # with an admin key; prints the new key once
//! fissile keys ls | fissile keys revoke KEY_ID
//! fissile keys create --tenant ops --admin --state-dir /var/lib/fissiled  # daemon stopped
//! ```
//! Locally, without a daemon (a VMM in this process's care):
//! ```text
//! fissile run -c 'x = 41' -c 'x + 1'      # boot, run cells in one REPL, power off
//! fissile demo                            # a session, fork, merge
//! fissile ctl vm/api.sock '{"op":"status"}'
//! ```

mod api;
mod local;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fissile",
    version,
    about = "Run Python in Fissile microVM sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Sandboxes on a fissiled: create, ls, show, rm.
    Sandbox {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(subcommand)]
        cmd: api::SandboxCmd,
    },
    /// Run a Python cell in a sandbox's REPL, streaming its output; exit 1 if it raised.
    Exec {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(flatten)]
        args: api::ExecArgs,
    },
    /// Run a shell command in a sandbox, streaming its output; exit with its exit code.
    Sh {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(flatten)]
        args: api::ShArgs,
    },
    /// Split a running sandbox into N copy-on-write children; prints their ids.
    Fork {
        #[command(flatten)]
        api: api::ApiOpts,
        /// The sandbox to fork (it keeps running).
        id: String,
        /// How many children.
        #[arg(short = 'n', long, default_value_t = 1)]
        n: u32,
    },
    /// The parent adopts the state of WINNER, a child of its latest fork.
    Merge {
        #[command(flatten)]
        api: api::ApiOpts,
        parent: String,
        winner: String,
    },
    /// Take a durable snapshot of a sandbox; prints its id (for `sandbox create --from-snapshot`).
    Snapshot {
        #[command(flatten)]
        api: api::ApiOpts,
        id: String,
    },
    /// Persistent spaces: ls, show, resume, rm.
    Spaces {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(subcommand)]
        cmd: api::SpacesCmd,
    },
    /// Templates and their ready snapshots: ls.
    Templates {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(subcommand)]
        cmd: api::TemplatesCmd,
    },
    /// API keys: over the API with an admin key, or in a stopped daemon's state directory.
    Keys {
        #[command(flatten)]
        api: api::ApiOpts,
        #[command(subcommand)]
        cmd: api::KeysCmd,
    },
    /// Local: boot a sandbox, run each `-c` cell in order in one REPL, power off.
    Run {
        #[command(flatten)]
        local: local::LocalOpts,
        /// A Python cell (repeat for more; state persists between them).
        #[arg(short = 'c', long = "code", required = true)]
        cells: Vec<String>,
    },
    /// Local: a persistent Python session with pandas and a plot, then fork(2) and merge_into.
    Demo {
        #[command(flatten)]
        local: local::LocalOpts,
    },
    /// Local: send one JSON request to a VMM's control socket and print the reply.
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// The request, e.g. '{"op":"status"}'.
        request: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match dispatch(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fissile: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cmd {
        Cmd::Sandbox { api, cmd } => ok(api::sandbox(&api.client()?, &api, cmd)),
        Cmd::Exec { api, args } => api::exec(&api.client()?, &args),
        Cmd::Sh { api, args } => api::sh(&api.client()?, &args),
        Cmd::Fork { api, id, n } => ok(api::fork(&api.client()?, &api, &id, n)),
        Cmd::Merge {
            api,
            parent,
            winner,
        } => ok(api::merge(&api.client()?, &parent, &winner)),
        Cmd::Snapshot { api, id } => ok(api::snapshot(&api.client()?, &api, &id)),
        Cmd::Spaces { api, cmd } => ok(api::spaces(&api.client()?, &api, cmd)),
        Cmd::Templates { api, cmd } => ok(api::templates(&api.client()?, &api, cmd)),
        Cmd::Keys { api, cmd } => api::keys(&api, cmd),
        Cmd::Run { local, cells } => ok(local::with_config(&local, |cfg| local::run(cfg, &cells))),
        Cmd::Demo { local } => ok(local::with_config(&local, local::demo)),
        Cmd::Ctl { socket, request } => ok(local::ctl(&socket, &request)),
    }
}
