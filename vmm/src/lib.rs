//! Fissile's virtual machine monitor: one process (or one embedded instance) per sandbox.
//!
//! Code map:
//! - [`config`]: validated user-facing configuration (flags or a TOML file).
//! - [`host`]: checks that this host's KVM can boot a standard guest (and the lab quirks).
//! - [`memory`]: guest RAM backed by a shared memfd, and the guest physical layout.
//! - [`arch`]: x86_64 boot state: PVH start info, GDT, registers, CPUID, MSRs, MP table.
//! - [`vstate`]: thin owners of the KVM VM and the vCPU threads (run/pause state machine).
//! - [`devices`]: legacy port devices (serial, i8042) and virtio-mmio devices.
//! - [`device_manager`]: the port-I/O and MMIO buses the vCPUs dispatch exits to.
//! - [`snapshot`]: the VM-state format (what a snapshot holds besides memory) and the
//!   [`snapshot::Persist`] trait every stateful device implements.
//! - [`builder`]: turns a config into a running [`Vmm`] (cold boot); [`restore`] builds one
//!   from a snapshot; both share one `start`.
//! - [`vmm`]: the running VM: [`Vmm`] (owner), [`VmmHandle`] (cloneable) and the lifecycle
//!   actor, the one thread that owns the VM's mutable state and runs operations in order.
//! - [`lifecycle`]: the operations the actor runs: snapshot, fork, persist, merge, rollback.
//! - [`api`]: the JSON-lines control socket (parses, dispatches to a `VmmHandle`, answers).
//! - [`seccomp`]: the seccomp filter each thread class installs first (`seccomp/x86_64.json`).
//! - [`logcap`]: the VMM's own log, capped (a guest decides how often some lines are written).
//!
//! Arrows run one way: `main` → `api` ← `vmm` → `lifecycle` → `snapshot`/`config` →
//! `vstate`/`devices` → `memory`/`arch` (`vmm` implements the `api` trait).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod host;
pub mod lifecycle;
pub mod logcap;
pub mod memory;
pub mod restore;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

pub use builder::{BuildError, VmmBuilder};
pub use config::{ConfigError, VmConfig};
pub use restore::{RestoreConfig, RestoreError, restore};
pub use vmm::{Vmm, VmmHandle};
pub use vstate::vcpu::VmExit;
