//! Wire formats shared by the Fissile VMM, snapshotd and the guest agent.
//!
//! Every protocol here is framed, versioned and size-capped; see each module's docs for the
//! exact encoding. [`uds`] binds the unix sockets they run over.

pub mod agent;
pub mod control;
pub mod frame;
pub mod net;
pub mod pidfd;
#[cfg(feature = "seccomp")]
pub mod seccomp;
pub mod signals;
pub mod snapshotd;
pub mod uds;

/// An error with its whole source chain, `a: b: c`: how every component renders a failure
/// into a protocol reply or a log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
