//! The VMM control socket protocol.
//!
//! Encoding: JSON lines over a unix stream socket. The client writes one request object per
//! line and reads exactly one response line per request. Requests are tagged by `op`:
//!
//! ```text
//! {"op":"status"}   -> {"ok":true,"status":{"state":"running","uptime_ms":1234,"vcpus":2,"mem_mib":512}}
//! {"op":"pause"}    -> {"ok":true}
//! {"op":"resume"}   -> {"ok":true}
//! {"op":"shutdown"} -> {"ok":true}
//! anything bad      -> {"ok":false,"error":"..."}
//! ```
//!
//! The request enum is `#[non_exhaustive]` so `snapshot`, `fork` and `merge` can be added
//! without breaking clients that only use the operations above. A request line is capped at
//! [`MAX_REQUEST_LINE`] bytes.

use serde::{Deserialize, Serialize};

/// Largest accepted request line, newline included. Longer lines get an error response and
/// the connection is closed.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// One control request (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ControlRequest {
    /// Report the VM's state, uptime, vCPU count and memory size.
    Status,
    /// Pause every vCPU. Returns once no vCPU is inside `KVM_RUN`.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Stop the VM and end the VMM process.
    Shutdown,
}

/// Lifecycle state of a VM as reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running guest code.
    Running,
    /// vCPUs are parked outside `KVM_RUN`.
    Paused,
    /// The guest has exited or a shutdown was requested.
    Exited,
}

/// Body of a successful `status` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Current lifecycle state.
    pub state: VmState,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory size in MiB.
    pub mem_mib: u64,
}

/// One control response (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Present on a successful `status` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// Present when `ok` is false: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ControlResponse {
    /// A bare success.
    pub fn ok() -> Self {
        Self {
            ok: true,
            status: None,
            error: None,
        }
    }

    /// A success carrying a status body.
    pub fn with_status(status: VmStatus) -> Self {
        Self {
            ok: true,
            status: Some(status),
            error: None,
        }
    }

    /// A failure with a message.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            status: None,
            error: Some(message.into()),
        }
    }
}
