//! Fissile guest agent: PID 1 of every sandbox (mounts, zombie reaping, poweroff) and the
//! server of the agent protocol ([`fissile_proto::agent`]): a persistent Python REPL, shell
//! commands and files. The same binary runs on a host over a unix socket
//! (`fissile-agent --listen-unix PATH`) so everything but the PID-1 duties is testable
//! without a VM.
//!
//! Code map: [`server`] accepts connections and dispatches requests; `repl` owns the Python
//! interpreter (driver.py runs inside it); `shell` runs commands; `files` does file requests;
//! `reaper` is the only `waitpid` caller; [`init`] does the PID-1 set-up; `sys` holds every
//! `unsafe` libc call; [`client`] is the host-side client.

pub mod client;
mod files;
pub mod init;
mod reaper;
mod repl;
pub mod server;
mod shell;
mod sys;

pub use client::{
    AgentClient, ClientError, ExecOutcome, MAX_COLLECTED_OUTPUT, ReadyListener, ShellOutcome,
};
pub use server::{Agent, AgentConfig, ServeError};

/// Starts the reaper thread now. As PID 1, call it right after [`init::init_guest`], before
/// any orphan can be reparented to us; on a host it starts on first use anyway.
pub fn start_reaper() {
    reaper::start();
}

/// This process's pid.
pub fn getpid() -> i32 {
    sys::getpid()
}
