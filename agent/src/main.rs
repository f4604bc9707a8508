//! `fissile-agent`: the guest's init and agent, or (with `--listen-unix`) the same agent on
//! a host for development, tests and benches.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fissile_agent::{Agent, AgentConfig, init};
use fissile_proto::agent::AGENT_VSOCK_PORT;

#[derive(Debug, Parser)]
#[command(version, about = "Fissile guest agent")]
struct Args {
    /// Listen on this unix socket instead of vsock (host mode; with `--init`, a smoke test
    /// of the init duties in a throw-away mount/UTS/network namespace).
    #[arg(long, value_name = "PATH")]
    listen_unix: Option<PathBuf>,
    /// Guest mode even when not PID 1: do the init duties, then listen on vsock.
    #[arg(long)]
    init: bool,
    /// vsock port (guest mode).
    #[arg(long, default_value_t = AGENT_VSOCK_PORT)]
    vsock_port: u32,
    /// Python interpreter of the REPL [env: FISSILE_PYTHON; default: python3].
    #[arg(long)]
    python: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let pid1 = fissile_agent::getpid() == 1;
    // The kernel passes init's arguments through; as PID 1 ignore ones we do not know.
    let args = if pid1 {
        Args::try_parse().unwrap_or(Args {
            listen_unix: None,
            init: true,
            vsock_port: AGENT_VSOCK_PORT,
            python: None,
        })
    } else {
        Args::parse()
    };
    let guest = pid1 || args.init;
    // Guest console is a slow serial port: errors only, unless RUST_LOG says otherwise.
    let default_level = if guest { "error" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if guest {
        init::init_guest();
    }
    fissile_agent::start_reaper();
    let python = args
        .python
        .or_else(|| std::env::var("FISSILE_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let config = AgentConfig {
        guest_mode: guest,
        python,
    };
    let result = match &args.listen_unix {
        Some(path) => {
            let listener = Agent::bind_unix(path)?;
            let agent = Agent::new(config);
            // Readiness signal for whoever started us (tests read this line).
            println!("fissile-agent listening on unix:{}", path.display());
            agent.serve_unix(listener)
        }
        None => {
            let agent = Agent::new(config);
            agent.serve_vsock(args.vsock_port)
        }
    };
    let err = result.context("agent server stopped");
    if pid1 {
        // PID 1 must never exit (kernel panic); report and power off instead.
        tracing::error!(error = ?err, "fatal");
        fissile_agent::server::fatal_poweroff();
    }
    err
}
