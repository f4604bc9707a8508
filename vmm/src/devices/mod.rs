//! Emulated devices: legacy port-I/O devices and virtio-mmio devices.
//!
//! Device state is plain data owned by each device struct (no hidden globals), so a
//! `Persist`-style save/restore can be added per device later.

pub mod legacy;
pub mod virtio;
