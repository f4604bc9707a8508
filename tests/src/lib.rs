//! Fissile integration tests and the lab harness.
//!
//! * [`lab`]: boots the lab (QEMU TCG with nested SVM) and runs commands in it, or runs them
//!   natively when the host's KVM can boot our guest. Used by the integration tests in
//!   `tests/tests/` and by hand through the `fissile-lab` binary.
//! * [`daemon`]: a `fissiled` process (keys, serve, readiness, graceful stop) for the API
//!   tests and the HTTP benchmark.
//! * [`guest`]: guest tests (real microVMs) run directly where KVM is usable, otherwise
//!   the test binary runs itself inside one lab boot.

pub mod daemon;
pub mod guest;
pub mod lab;
