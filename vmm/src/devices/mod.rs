//! Emulated devices: legacy port-I/O devices and virtio-mmio devices.
//!
//! Device state is plain data owned by each device struct (no hidden globals); every
//! stateful device implements [`crate::snapshot::Persist`], which snapshot, restore and
//! merge go through.

pub mod legacy;
pub mod virtio;
